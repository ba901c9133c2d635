"""Consolidation: a sharded FSDP checkpoint to safetensors, bit-exact, and back into a sharded run."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.runner import ROOT, assert_ok, run_script

pytestmark = pytest.mark.distributed


def _consolidate(*args):
    completed = subprocess.run(
        [sys.executable, "-m", "shardtrain", "consolidate", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.split()


def test_consolidate_round_trip(tmp_path):
    train = tmp_path / "train"
    assert_ok(
        run_script(
            "train_gpt.py",
            train,
            "--devices",
            "2",
            "--strategy",
            "fsdp",
            "--batch-size",
            "8",
            "--max-steps",
            "3",
            "--save-at-end",
            "--dump-weights",
            "end",
        )
    )
    trained = load_file(str(train / "weights_end.safetensors"))
    checkpoint = train / "checkpoints" / "step=3"

    single = _consolidate(checkpoint, tmp_path / "model.safetensors")
    assert single == [str(tmp_path / "model.safetensors")]
    exported = load_file(single[0])
    assert exported.keys() == trained.keys() and len(exported) > 10
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name  # values, not only names
        assert exported[name].abs().sum() > 0, f"{name} is empty"

    optimizer_file = _consolidate(
        checkpoint, tmp_path / "model2.safetensors", "--optimizer", tmp_path / "optimizer.safetensors"
    )[-1]
    moments = load_file(optimizer_file)
    assert "state.model.blocks.0.mlp.up.weight.exp_avg" in moments
    assert (
        moments["state.model.blocks.0.mlp.up.weight.exp_avg_sq"].shape == trained["model.blocks.0.mlp.up.weight"].shape
    )

    files = _consolidate(checkpoint, tmp_path / "split", "--max-shard-size", "200KiB")
    assert len(files) > 1
    index = json.loads((tmp_path / "split" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(trained)
    merged = {}
    for path in files:
        merged.update(load_file(path))
    assert all(torch.equal(merged[name], tensor) for name, tensor in trained.items())

    # ... and back into a sharded run (2 ranks, FSDP): the model starts from exactly these weights.
    resumed = tmp_path / "resumed"
    assert_ok(
        run_script(
            "train_gpt.py",
            resumed,
            "--devices",
            "2",
            "--strategy",
            "fsdp",
            "--batch-size",
            "8",
            "--max-steps",
            "1",
            "--ckpt-path",
            str(tmp_path / "split"),
            "--dump-weights",
            "start",
        )
    )
    started = load_file(str(resumed / "weights_start.safetensors"))
    assert all(torch.equal(started[name], tensor) for name, tensor in trained.items())


def test_consolidate_errors(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardtrain",
            "consolidate",
            str(tmp_path / "missing"),
            str(tmp_path / "out.safetensors"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2 and "no checkpoint at" in completed.stderr
