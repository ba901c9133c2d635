"""A save killed half-way leaves ``.<name>.partial``; the next save into the directory removes it,
but never the staging directory of an asynchronous save that is still being written."""

import subprocess
import sys
import textwrap
import threading

import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import ModelCheckpoint, TrainModule, Trainer
from shardtrain.checkpoint import sharded

KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path
    import torch
    from shardtrain.checkpoint.sharded import partial_path, save_sharded

    target = Path(sys.argv[1])
    staging = partial_path(target)

    def kill_when_writing():
        while not any(staging.glob("*.distcp")):
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill_when_writing, daemon=True).start()
    tensors = {"model": {f"w{i}": torch.randn(1024, 1024) for i in range(16)}}
    save_sharded(target, tensors, {"state": {}}, rank=0, barrier=lambda: None)
    """
)


class Tiny(TrainModule):
    def configure_model(self):
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_next_save_removes_a_partial_directory_left_by_a_killed_save(tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(checkpoints / "step=2")], capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr
    stale = checkpoints / ".step=2.partial"
    assert stale.is_dir() and any(stale.glob("*.distcp")) and not (stale / "meta.json").exists()

    x = torch.randn(32, 4)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        logger=False,
        callbacks=[ModelCheckpoint(every_n_train_steps=3)],
    )
    trainer.fit(Tiny(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))

    assert not stale.exists()
    assert "removed 1 unfinished checkpoint save(s) left by an earlier crash" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step=3"]
    assert (checkpoints / "last").read_text() == "step=3" and (checkpoints / "step=3" / "meta.json").is_file()


def test_a_save_does_not_remove_the_staging_directory_of_an_asynchronous_save_in_flight(tmp_path, monkeypatch):
    commit, release = sharded._commit, threading.Event()

    def commit_when_released(staging, target, *args):
        if target.name == "a":  # the asynchronous save stays in flight until the second save is done
            release.wait(timeout=60)
        commit(staging, target, *args)

    monkeypatch.setattr(sharded, "_commit", commit_when_released)
    first = {"w": torch.arange(1000.0)}
    pending = sharded.save_sharded_async(tmp_path / "a", first, {"state": {}}, rank=0, barrier=lambda: None)
    assert sharded.partial_path(tmp_path / "a").is_dir()
    sharded.save_sharded(tmp_path / "b", {"w": torch.ones(3)}, {"state": {}}, rank=0, barrier=lambda: None)
    release.set()
    assert pending.wait() == tmp_path / "a"
    loaded = {"w": torch.zeros(1000)}
    sharded.load_sharded(tmp_path / "a", loaded)
    assert torch.equal(loaded["w"], first["w"]) and (tmp_path / "b" / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
