"""The benchmark harness runs both sides and writes its JSON (figures themselves are not asserted: no timing in tests)."""

import json
import subprocess
import sys

import pytest

from tests.distributed.runner import ROOT

pytestmark = pytest.mark.distributed


def test_benchmark_writes_results(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--small", "--steps", "5", "--configs", "ddp", "fsdp", "--out", str(tmp_path)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    for name in ("ddp", "fsdp"):
        entry = report["configs"][name]
        assert entry["reference"]["ranks"] == entry["shardtrain"]["ranks"] == 2
        assert entry["ratio_tokens_per_sec"] > 0 and entry["shardtrain"]["peak_memory_per_rank_bytes"] > 0
    assert "ratio" in completed.stdout
