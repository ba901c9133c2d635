"""ThroughputMonitor in real multi-process runs: it changes nothing in training, counts the model's
FLOPs exactly (activation recomputation excluded, whatever the strategy), and its figures agree
with each other."""

import json

import pytest
import torch
import torch.nn.functional as F

from examples.gpt.model import GPT, GPTConfig
from shardtrain.flops import count_training_flops
from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed

BATCH = 4  # sequences per process


def expected_flops_per_batch() -> int:
    """The same model and batch counted in this process, on the meta device."""
    config = GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=32)
    with torch.device("meta"):
        model = GPT(config)
        tokens = torch.zeros(BATCH, config.seq_len, dtype=torch.long)
    return count_training_flops(lambda: F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())).model


def train(tmp_path, name, *args):
    return assert_ok(
        run_script(
            "train_gpt.py", tmp_path / name, "--devices", "2", "--batch-size", str(BATCH), "--max-steps", "6", *args
        )
    ).result()


def test_monitor_under_fsdp_counts_the_model_and_changes_nothing(tmp_path):
    plain = train(tmp_path, "plain", "--strategy", "fsdp")
    monitored = train(tmp_path, "monitored", "--strategy", "fsdp", "--throughput-monitor")
    checkpointed = train(
        tmp_path,
        "checkpointed",
        "--strategy",
        "fsdp",
        "--throughput-monitor",
        "--strategy-options",
        json.dumps({"activation_checkpointing_policy": ["Block"]}),
    )
    assert monitored["losses"] == plain["losses"]  # counting FLOPs in step 1 does not change the numbers
    assert monitored["weight_checksum"] == plain["weight_checksum"]
    # the CPU attention kernel counts its backward as flash attention does (recomputing the scores),
    # the meta count as the math path does: equal forward, backward within one attention matmul
    expected = expected_flops_per_batch()
    assert abs(monitored["flops_per_batch"] - expected) / expected < 0.02
    assert checkpointed["flops_per_batch"] == monitored["flops_per_batch"]

    rows = [row for row in monitored["throughput"] if row]
    assert len(rows) == 5  # logged every step; the first step (counting, warm-up) is not timed
    for row in rows:
        assert row["throughput/tokens_per_sec"] == pytest.approx(
            row["throughput/samples_per_sec"] * monitored["seq_len"]
        )
        assert row["throughput/flops_per_sec"] == pytest.approx(2 * row["throughput/flops_per_sec_per_device"])
        assert row["throughput/mfu"] == pytest.approx(
            row["throughput/flops_per_sec_per_device"] / monitored["peak_flops"]
        )
        # one batch per step on each rank: per-device FLOP/s is the batch's FLOPs over the step time
        assert row["throughput/flops_per_sec_per_device"] == pytest.approx(
            monitored["flops_per_batch"] / row["throughput/step_time"], rel=1e-6
        )
        assert 0 < row["throughput/mfu"] < 1
        assert row["throughput/peak_memory_gib"] > 0


def test_monitor_under_deepspeed_zero3_counts_the_same_flops(tmp_path):
    pytest.importorskip("deepspeed")
    fsdp = train(tmp_path, "fsdp", "--strategy", "fsdp", "--throughput-monitor")
    zero3 = train(tmp_path, "zero3", "--strategy", "deepspeed_stage_3", "--throughput-monitor")
    assert zero3["flops_per_batch"] == fsdp["flops_per_batch"]
    rows = [row for row in zero3["throughput"] if row]
    assert len(rows) == 5 and all(0 < row["throughput/mfu"] < 1 for row in rows)
