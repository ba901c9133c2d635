"""Verified checkpoints in one process: every file a save writes is recorded with its size and CRC-32, and a
file damaged after the save (a flipped bit, a truncation, a deleted file, an edited meta.json) is refused by
name before anything loads it; ``ckpt_path="last"`` falls back to the newest earlier checkpoint that
verifies; a checkpoint saved before checksums loads with a warning; ``shardtrain verify`` says the same."""

import json
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import DamagedCheckpointError, TrainModule, Trainer
from shardtrain.checkpoint.sharded import verify_checkpoint
from shardtrain.cli import main as cli
from shardtrain.errors import CheckpointError


class Tiny(TrainModule):
    def configure_model(self):
        self.net = torch.nn.Linear(64, 64)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def _fit(root, max_steps, ckpt_path=None, every=None):
    from shardtrain import ModelCheckpoint

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 64)), batch_size=8)
    callbacks = [ModelCheckpoint(every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        seed=0,
    )
    module = Tiny()
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module


@pytest.fixture
def saved(tmp_path):
    """Checkpoints at steps 2 and 4; ``last`` names step 4."""
    _fit(tmp_path, 4, every=2)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step=2", "step=4"]
    return checkpoints


def _shard(checkpoint):
    (shard,) = checkpoint.glob("__0_*.distcp")
    return shard


def _flip_a_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if offset is None else offset
    data[where] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_save_records_every_file_it_wrote_with_its_size_and_crc(saved):
    checkpoint = saved / "step=4"
    meta = json.loads((checkpoint / "meta.json").read_text())
    written = {p.name for p in checkpoint.iterdir()} - {"meta.json"}
    assert set(meta["checksums"]) == written == {".metadata", _shard(checkpoint).name}
    for name, recorded in meta["checksums"].items():
        assert recorded["bytes"] == (checkpoint / name).stat().st_size
        assert len(recorded["crc32"]) == 8
    assert not list(checkpoint.glob(".checksums_rank*")), "the ranks' sidecar files are merged and removed"
    verify_checkpoint(checkpoint, distributed=False)  # raises nothing


def test_a_flipped_bit_is_refused_naming_the_file_and_last_falls_back_to_the_previous_checkpoint(saved, capsys):
    shard = _shard(saved / "step=4")
    _flip_a_bit(shard)
    with pytest.raises(
        DamagedCheckpointError, match=rf"checkpoint .*step=4 is damaged: {shard.name}: CRC-32 "
    ) as error:
        _fit(saved.parent, 6, ckpt_path=saved / "step=4")
    assert error.value.problems == [error.value.problems[0]] and shard.name in error.value.problems[0]

    trainer, _ = _fit(saved.parent, 4, ckpt_path="last")
    out = capsys.readouterr().out
    assert f"{shard.name}: CRC-32" in out and "resuming from" in out and "step=2 instead" in out
    assert trainer.global_step == 4  # resumed at step 2, trained steps 3 and 4 again


def test_last_with_no_checkpoint_that_verifies_is_refused(saved):
    _flip_a_bit(_shard(saved / "step=4"))
    _flip_a_bit(_shard(saved / "step=2"))
    with pytest.raises(CheckpointError, match=r"no earlier checkpoint in .* verifies either"):
        _fit(saved.parent, 6, ckpt_path="last")


def test_a_truncated_or_missing_file_is_refused_naming_it(saved):
    shard = _shard(saved / "step=4")
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 3])
    with pytest.raises(DamagedCheckpointError, match=rf"{shard.name}: {size // 3} bytes, {size} were written"):
        verify_checkpoint(saved / "step=4", distributed=False)
    (saved / "step=2" / ".metadata").unlink()
    with pytest.raises(DamagedCheckpointError, match=r"\.metadata: missing"):
        verify_checkpoint(saved / "step=2", distributed=False)


def test_an_edited_or_unreadable_meta_json_is_refused(saved):
    meta_path = saved / "step=4" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["state"]["loop"]["global_step"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta.json is damaged: its content does not match the CRC-32"):
        verify_checkpoint(saved / "step=4", distributed=False)
    meta_path.write_bytes(b"\xff\xfe{not json")
    with pytest.raises(CheckpointError, match=r"meta.json is damaged \(not valid JSON"):
        verify_checkpoint(saved / "step=4", distributed=False)


def test_a_checkpoint_saved_before_checksums_loads_with_a_warning(saved):
    meta_path = saved / "step=4" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["checksums"], meta["meta_crc32"]
    meta_path.write_text(json.dumps(meta))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(saved.parent, 5, ckpt_path=saved / "step=4")
    assert trainer.global_step == 5
    assert any("records no checksums" in str(w.message) for w in caught)


def test_shardtrain_verify_names_damaged_files_and_exits_1(saved, capsys):
    assert cli(["verify", str(saved / "step=2"), str(saved / "last")]) == 0
    assert capsys.readouterr().out.count(": ok (2 files") == 2
    shard = _shard(saved / "step=4")
    _flip_a_bit(shard, offset=0)
    assert cli(["verify", str(saved / "step=2"), str(saved / "step=4")]) == 1
    out = capsys.readouterr().out
    assert "step=2: ok" in out and "step=4: DAMAGED" in out and f"  {shard.name}: CRC-32" in out
    assert cli(["consolidate", str(saved / "step=4"), str(saved / "out.safetensors")]) == 2  # refused too
    assert f"{shard.name}: CRC-32" in capsys.readouterr().err
