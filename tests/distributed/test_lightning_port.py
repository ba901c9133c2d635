"""The Lightning oracle on 2 processes: a module of ``tests/lightning_port`` run under Lightning's ddp as written,
and under shardtrain's strategies ported by its imports; what they did must match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.runner import assert_ok, run_script


def run_port(out: Path, module: str, flavour: str, strategy: str, **trainer_kwargs: Any) -> list[dict[str, Any]]:
    """Each rank's records of ``module``'s experiment under torchrun with 2 processes."""
    run = assert_ok(
        run_script(
            "lightning_port.py",
            out,
            "--module",
            module,
            "--flavour",
            flavour,
            "--strategy",
            strategy,
            "--kwargs",
            json.dumps(trainer_kwargs),
            torchrun=2,
            timeout=300,
        )
    )
    return [run.result(f"rank{rank}.json") for rank in range(2)]


@pytest.mark.fast
def test_basic_fit_under_ddp_and_fsdp_matches_lightnings_ddp(tmp_path):
    theirs = run_port(tmp_path / "lightning", "basic", "lightning", "ddp")
    for strategy in ("ddp", "fsdp"):
        ours = run_port(tmp_path / strategy, "basic", "shardtrain", strategy)
        for rank in range(2):
            assert ours[rank]["global_step"] == theirs[rank]["global_step"]
            assert ours[rank]["calls"] == theirs[rank]["calls"], (strategy, rank)  # the backward hook among them
            assert ours[rank]["backward_losses"] == pytest.approx(theirs[rank]["backward_losses"], abs=1e-5)
            for name, values in theirs[rank]["weights"].items():
                assert ours[rank]["weights"][name] == pytest.approx(values, abs=1e-5), (strategy, rank, name)
        their_losses = [row["loss"] for row in theirs[0]["rows"] if "loss" in row]  # rank 0's own, as Lightning
        assert [row["loss"] for row in ours[0]["rows"] if "loss" in row] == pytest.approx(their_losses, abs=1e-5)


@pytest.mark.parametrize("name", ["realistic_classifier", "realistic_gpt"])
def test_a_module_written_for_lightning_runs_ported_under_ddp_fsdp_and_deepspeed_as_under_lightnings_ddp(
    tmp_path, name
):
    """Each rank's records (weights, metrics, results, its own predictions, checkpoints, hyperparameters) of
    Lightning's ddp, and of shardtrain's ddp, fsdp and deepspeed (ZeRO-2) on the module ported by its imports."""
    from tests.lightning_port.compare import assert_same
    from tests.unit.test_lightning_realistic import _comparable

    theirs = run_port(tmp_path / "lightning", name, "lightning", "ddp")
    for strategy in ("ddp", "fsdp", "deepspeed"):
        ours = run_port(tmp_path / strategy, name, "shardtrain", strategy)
        for rank in range(2):
            assert_same(
                *_comparable(
                    ours[rank], tmp_path / strategy / "shardtrain", theirs[rank], tmp_path / "lightning" / "lightning"
                )
            )
