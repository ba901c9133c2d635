"""Estimates against real runs over gloo, and strategy="auto" choosing from them."""

import pytest

from examples.gpt.model import GPTConfig, GPTModule
from shardtrain.estimate import estimate_memory
from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_model_state_estimate_matches_measured(tmp_path, strategy):
    measured = assert_ok(run_script("fsdp_memory.py", tmp_path, "--what", "states", "--strategy", strategy)).result(
        "rank0.json"
    )
    estimate = estimate_memory(GPTModule(GPTConfig(n_layer=4, n_head=4, d_model=256, seq_len=64)), devices=2).get(
        strategy
    )
    for key, estimated in (
        ("params", estimate.parameters),
        ("grads", estimate.gradients),
        ("optimizer", estimate.optimizer),
    ):
        assert estimated == pytest.approx(measured[key], rel=0.15), (key, estimated, measured[key])


def test_auto_picks_ddp_for_a_small_model(tmp_path):
    result = assert_ok(
        run_script("train_gpt.py", tmp_path, "--devices", "2", "--batch-size", "8", "--max-steps", "2")
    ).result()
    assert result["strategy"] == "DDPStrategy"


def test_auto_picks_fsdp_when_ddp_does_not_fit(tmp_path):
    estimate = estimate_memory(GPTModule(GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=32)), devices=2)
    between = (estimate.get("ddp").device_total + estimate.get("fsdp").device_total) // 2
    run = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path,
            "--devices",
            "2",
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            env={"SHARDTRAIN_DEVICE_MEMORY": str(int(between / 0.9))},
        )
    )
    assert run.result()["strategy"] == "FSDPStrategy"
    assert "strategy='auto' chose fsdp" in run.output
