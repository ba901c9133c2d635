"""Loading a checkpoint never runs code from it: a payload planted in ``.metadata`` or in a non-tensor
entry is refused, by every load path, with an error naming the file; a checkpoint of release 0.1.0 loads."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import CheckpointError, Engine, Trainer
from shardtrain.checkpoint.consolidate import consolidate, consolidate_optimizer
from shardtrain.checkpoint.pointer import resolve_checkpoint
from shardtrain.cli import main as cli
from tests.checkpoint_payloads import plant_in_bytes_entry, plant_in_metadata, rerecord_checksums
from tests.unit.linear_module import LinearRegression

RELEASE_0_1_0 = Path(__file__).parent / "data" / "checkpoint_0.1.0"


@pytest.fixture
def engine():
    engine = Engine(accelerator="cpu", devices=1)
    engine.launch()
    return engine


def _model_and_optimizer(engine, sizes=(4, 8, 2)):
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2]))
    return engine.setup(model, torch.optim.AdamW(model.parameters(), lr=0.1))


@pytest.fixture
def checkpoint(engine, tmp_path):
    model, optimizer = _model_and_optimizer(engine)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return engine.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "step": 7})


def _load(engine, path):
    model, optimizer = _model_and_optimizer(engine)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    engine.load(path, state)
    return state


def test_a_payload_in_metadata_is_refused_before_it_runs(engine, checkpoint, tmp_path):
    marker = tmp_path / "ran"
    plant_in_metadata(checkpoint, marker)
    with pytest.raises(CheckpointError, match=r"ckpt/\.metadata asks to run .*open") as error:
        _load(engine, checkpoint)
    assert not marker.exists()
    assert "not loaded" in str(error.value)


def test_the_planted_payload_would_run_under_plain_pickle(checkpoint, tmp_path):
    """The test's payload is real: unpickled as PyTorch's FileSystemReader does, it runs."""
    marker = tmp_path / "ran"
    plant_in_metadata(checkpoint, marker)
    with open(checkpoint / ".metadata", "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_a_payload_in_a_non_tensor_entry_is_refused_naming_its_file(engine, checkpoint, tmp_path):
    marker = tmp_path / "ran"
    data_file = plant_in_bytes_entry(checkpoint, marker)
    with pytest.raises(CheckpointError, match=rf"{data_file} holds an entry \(optimizer\.param_groups\.0\.\w+\)"):
        _load(engine, checkpoint)
    assert not marker.exists()


def test_resume_through_the_trainer_refuses_the_payload(tmp_path):
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))

    def fit(max_steps, ckpt_path=None):
        trainer = Trainer(
            accelerator="cpu", max_steps=max_steps, default_root_dir=tmp_path, enable_progress_bar=False, logger=False
        )
        trainer.fit(LinearRegression(), DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
        return trainer

    fit(2).save_checkpoint()
    marker = tmp_path / "ran"
    plant_in_metadata(resolve_checkpoint(tmp_path / "checkpoints" / "last"), marker)
    with pytest.raises(CheckpointError, match=r"\.metadata asks to run"):
        fit(4, ckpt_path="last")
    assert not marker.exists()


@pytest.mark.parametrize("reader", ["consolidate", "consolidate_optimizer"])
def test_consolidation_refuses_the_payload(checkpoint, tmp_path, reader):
    marker = tmp_path / "ran"
    plant_in_metadata(checkpoint, marker)
    export = consolidate if reader == "consolidate" else consolidate_optimizer
    with pytest.raises(CheckpointError, match=r"\.metadata asks to run"):
        export(checkpoint, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_the_cli_consolidate_refuses_the_payload(checkpoint, tmp_path, capsys):
    marker = tmp_path / "ran"
    plant_in_metadata(checkpoint, marker)
    code = cli(["consolidate", str(checkpoint), str(tmp_path / "out.safetensors"), "--optimizer", str(tmp_path / "o")])
    assert code != 0 and not marker.exists()
    assert ".metadata asks to run" in capsys.readouterr().err


def test_consolidation_reads_tensors_only(checkpoint, tmp_path):
    """A payload in a non-tensor entry is never even read by an export (weights and optimizer state)."""
    marker = tmp_path / "ran"
    plant_in_bytes_entry(checkpoint, marker)
    assert (
        cli(["consolidate", str(checkpoint), str(tmp_path / "out.safetensors"), "--optimizer", str(tmp_path / "o")])
        == 0
    )
    assert not marker.exists() and (tmp_path / "out.safetensors").is_file()


def test_hf_export_refuses_the_payload(checkpoint, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config_dir = tmp_path / "llama"
    transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(config_dir)
    marker = tmp_path / "ran"
    plant_in_metadata(checkpoint, marker)
    code = cli(["consolidate", str(checkpoint), str(tmp_path / "hf"), "--format", "hf", "--hf-config", str(config_dir)])
    assert code != 0 and not marker.exists()
    assert ".metadata asks to run" in capsys.readouterr().err


def test_metadata_pointing_outside_its_directory_is_refused(engine, checkpoint, tmp_path):
    with open(checkpoint / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)
    next(iter(metadata.storage_data.values())).relative_path = "../elsewhere.distcp"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    rerecord_checksums(checkpoint)  # past the checksums: the reader refuses it
    with pytest.raises(CheckpointError, match="outside its checkpoint directory"):
        _load(engine, checkpoint)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not metadata"])
def test_unreadable_metadata_is_a_checkpoint_error(engine, checkpoint, damage):
    path = checkpoint / ".metadata"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a pickle at all")
    else:
        path.write_bytes(pickle.dumps({"a": 1}))
    rerecord_checksums(checkpoint)  # past the checksums: the reader refuses it
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        _load(engine, checkpoint)


def test_a_checkpoint_written_by_release_0_1_0_still_loads(engine, tmp_path):
    copy = shutil.copytree(RELEASE_0_1_0 / "checkpoint", tmp_path / "checkpoint")
    expected = json.loads((RELEASE_0_1_0 / "expected.json").read_text())
    model, optimizer = _model_and_optimizer(engine, sizes=(4, 3, 2))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    with pytest.warns(UserWarning, match=r"records no checksums \(saved by a shardtrain before they were recorded\)"):
        engine.load(copy, state)
    assert state["step"] == 7
    for name, value in model.module.state_dict().items():
        assert torch.equal(value, torch.tensor(expected["model"][name])), name
    saved_state = optimizer.optimizer.state_dict()["state"]
    for index, value in expected["exp_avg_sq"].items():
        assert torch.equal(saved_state[int(index)]["exp_avg_sq"], torch.tensor(value))


def test_no_load_path_bypasses_the_safe_reader():
    """Every DCP load in the library goes through ``checkpoint.safe_reader``; nothing unpickles freely."""
    source = Path(__file__).resolve().parents[2] / "src" / "shardtrain"
    offences = []
    for path in source.rglob("*.py"):
        if path.name == "safe_reader.py":
            continue
        text = path.read_text()
        for pattern in ("FileSystemReader(", "pickle.load", "weights_only=False", "torch.load("):
            if pattern in text:
                offences.append(f"{path.relative_to(source)}: {pattern}")
        for call in text.split("dcp.load(")[1:]:
            if "planner=SafeLoadPlanner(" not in call[: call.find("\n)") if "\n)" in call else 400]:
                offences.append(f"{path.relative_to(source)}: dcp.load without SafeLoadPlanner")
    assert offences == []
