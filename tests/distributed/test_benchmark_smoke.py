"""The benchmark harness runs both sides and writes its JSON and chart (figures themselves are not
asserted beyond their consistency: no timing in tests)."""

import json
import subprocess
import sys

import pytest

from tests.distributed.runner import ROOT

pytestmark = pytest.mark.distributed

CONFIGS = ("ddp", "fsdp_ac", "zero3")  # every reference script: DDP, FSDP2, deepspeed.initialize


def test_benchmark_writes_results(tmp_path):
    pytest.importorskip("deepspeed")
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--model",
        "small",
        "--steps",
        "5",
        "--warmup",
        "2",
        "--configs",
        *CONFIGS,
        "--out",
        str(tmp_path),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["peak_flops_per_device"] > 0 and report["model_flops_per_token"] > 0
    for name in CONFIGS:
        entry = report["configs"][name]
        ours, reference = entry["shardtrain"], entry["reference"]
        assert reference["ranks"] == ours["ranks"] == 2
        assert entry["ratio_tokens_per_sec"] == pytest.approx(ours["tokens_per_sec"] / reference["tokens_per_sec"])
        assert entry["ratio_peak_memory"] == pytest.approx(
            ours["peak_memory_per_rank_bytes"] / reference["peak_memory_per_rank_bytes"]
        )
        for side in (ours, reference):
            assert side["mfu"] == pytest.approx(
                side["tokens_per_sec"] * report["model_flops_per_token"] / (2 * report["peak_flops_per_device"])
            )
        # the Trainer side's ThroughputMonitor counted the same model from its real first step; the
        # CPU attention kernel's backward recomputes the scores, the meta count's math path does not
        assert ours["monitor_flops_per_batch"] == pytest.approx(report["model_flops_per_token"] * 4 * 64, rel=0.03)
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000
    assert "ratio" in completed.stdout
