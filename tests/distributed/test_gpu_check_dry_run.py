"""benchmarks/gpu_check.py --dry-run: the GPU check's own code runs on CPU before GPU time is spent on it.

The fastest rows only (the full dry-run, with torch.compile and DeepSpeed, takes about 2.5 minutes
on 2 cores): DDP, FSDP with bf16-mixed and activation checkpointing, FSDP with CPU offload, and
the benchmark's reference and shardtrain sides.
"""

import json
import math
import subprocess
import sys

import pytest

from tests.distributed.runner import ROOT

pytestmark = pytest.mark.distributed

ROWS = ["ddp", "fsdp_bf16_ac", "fsdp_cpu_offload"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)]
    completed = subprocess.run(
        [*command, "--rows", *ROWS, "benchmark"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "PASSED" in (out / "table.txt").read_text()
    return json.loads((out / "gpu_check.json").read_text())


def test_every_row_trains_and_resumes_exactly(report):
    settings = report["settings"]
    assert [row["name"] for row in report["rows"]] == ROWS
    for row in report["rows"]:
        assert row["status"] == "pass", row["error"]
        losses = row["losses"]
        assert len(losses) == settings["steps"] and all(math.isfinite(loss) for loss in losses)
        assert losses[-1] < losses[0] - 0.5, losses  # measured: 5.52 -> 4.18 in 8 steps
        for kind in ("sync", "async"):
            resumed = row["resumed"][kind]
            assert resumed["losses"] == losses[resumed["from_step"] :], (row["name"], kind)  # exact, on CPU
        assert row["resumed"]["sync"]["from_step"] < row["resumed"]["async"]["from_step"] < settings["steps"]


def test_the_benchmark_sides_ran_and_the_missing_lightning_is_skipped(report):
    bench = report["benchmark"]
    assert bench["status"] == "pass"
    for side in ("reference", "shardtrain"):
        figures = bench["sides"][side]
        assert figures["status"] == "pass" and figures["tokens_per_sec"] > 0 and figures["peak_memory_bytes"] > 0
        assert figures["mfu"] > 0
    assert bench["estimated_fsdp_bytes"] > 0
    # Lightning's FSDP refuses CPU: the column is skipped with a note, whether or not lightning is installed.
    assert bench["sides"]["lightning"]["status"] == "skipped"
