"""Bad checkpoints give errors that say what is wrong: another model, a missing or half-written directory, a newer format."""

import json
import shutil

import pytest
import torch
from torch import nn

from shardtrain import CheckpointError, Engine


@pytest.fixture
def engine():
    engine = Engine(accelerator="cpu", devices=1)
    engine.launch()
    return engine


def _setup(engine, model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return engine.setup(model, optimizer)


def _save(engine, path, model=None):
    model, optimizer = _setup(engine, model or nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return engine.save(path, {"model": model, "optimizer": optimizer, "step": 7}), model


def test_round_trip_and_plain_values(engine, tmp_path):
    path, saved_model = _save(engine, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir())[:2] == [".metadata", "__0_0.distcp"]
    assert (path / "meta.json").is_file() and not (tmp_path / ".ckpt.partial").exists()
    model, optimizer = _setup(engine, nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    engine.load(path, state)
    assert state["step"] == 7
    for a, b in zip(model.parameters(), saved_model.parameters()):
        assert torch.equal(a, b)
    assert len(optimizer.state) == 4


def test_checkpoint_from_another_model_lists_the_differences(engine, tmp_path):
    path, _ = _save(engine, tmp_path / "ckpt")
    other, optimizer = _setup(engine, nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(CheckpointError) as error:
        engine.load(path, {"model": other})
    message = str(error.value)
    assert "is from a different model" in message
    assert "not in the model" not in message
    assert "missing from the checkpoint: ['3.bias', '3.weight']" in message
    assert "0.weight: checkpoint (8, 4), model (16, 4)" in message


def test_missing_directory(engine, tmp_path):
    model, _ = _setup(engine, nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere; check the path"):
        engine.load(tmp_path / "nowhere", {"model": model})


def test_half_written_checkpoint(engine, tmp_path):
    path, _ = _save(engine, tmp_path / "ckpt")
    (path / "meta.json").unlink()  # what a crash before the commit leaves (the .partial directory)
    model, _ = _setup(engine, nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    with pytest.raises(CheckpointError, match="half-written"):
        engine.load(path, {"model": model})


def test_newer_format(engine, tmp_path):
    path, _ = _save(engine, tmp_path / "ckpt")
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    model, _ = _setup(engine, nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    with pytest.raises(CheckpointError, match="format version 99; this shardtrain reads up to 2: upgrade shardtrain"):
        engine.load(path, {"model": model})


def test_entry_not_in_checkpoint(engine, tmp_path):
    path, _ = _save(engine, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="has no entry 'scheduler'"):
        engine.load(path, {"scheduler": None})


def test_saving_again_replaces_and_leaves_no_staging(engine, tmp_path):
    _save(engine, tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / ".ckpt.partial")  # a stale staging dir from a crash
    path, model = _save(engine, tmp_path / "ckpt")
    assert not (tmp_path / ".ckpt.partial").exists() and not (tmp_path / ".ckpt.old").exists()
    fresh, _ = _setup(engine, nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    engine.load(path, {"model": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
