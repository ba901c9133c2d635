"""Modules written for Lightning, the way its users write them (``tests/lightning_port/realistic_*.py``), ported by
changing their imports only: fit, validate, test, predict and load_from_checkpoint do what they do under Lightning,
in one process (the same weights, metrics, results, predictions, checkpoint names, hyperparameters, log layout)."""

from __future__ import annotations

import pytest

from tests.lightning_port import run
from tests.lightning_port.compare import assert_same


def _without_root(records: dict, root) -> dict:
    """Paths under the run's own directory, made relative (each flavour writes under its own root)."""
    text = str(root)
    return {
        key: (value.replace(text, "<root>") if isinstance(value, str) else value) for key, value in records.items()
    } | {
        "logged_hparams": {
            k: (v.replace(text, "<root>") if isinstance(v, str) else v)
            for k, v in records.get("logged_hparams", {}).items()
        },
        "datamodule_hparams": {
            k: (v.replace(text, "<root>") if isinstance(v, str) else v)
            for k, v in records.get("datamodule_hparams", {}).items()
        },
    }


@pytest.mark.parametrize("name", ["realistic_classifier", "realistic_gpt"])
def test_a_module_written_for_lightning_runs_ported_as_under_lightning(tmp_path, name):
    theirs = run(name, "lightning", tmp_path / "lightning")
    ours = run(name, "shardtrain", tmp_path / "shardtrain", strategy="single")
    assert_same(*_comparable(ours, tmp_path / "shardtrain", theirs, tmp_path / "lightning"))


def _comparable(ours: dict, our_root, theirs: dict, their_root) -> tuple[dict, dict]:
    """Both runs' records with what differs by design made alike: paths relative to each run's root, and checkpoint
    names (shardtrain's default is ``step=<N>`` beside its ``last`` pointer; Lightning's ``epoch=<E>-step=<N>.ckpt``)."""
    ours, theirs = _without_root(ours, our_root), _without_root(theirs, their_root)
    if "checkpoints" in ours:
        ours["checkpoints"] = sorted(name.split("step=")[1] for name in ours["checkpoints"] if name != "last")
        theirs["checkpoints"] = sorted(name.split("step=")[1].removesuffix(".ckpt") for name in theirs["checkpoints"])
    return ours, theirs
