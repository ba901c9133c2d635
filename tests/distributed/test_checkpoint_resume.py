"""Trainer checkpoints under DDP and FSDP: a resumed run continues the exact loss curve, across strategies."""

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def uninterrupted(reference_run):
    """One process, global batch 16: the reference curve (run once a session, shared)."""
    return reference_run("train_gpt.py", "--devices", "1", "--batch-size", "16")


@pytest.mark.parametrize(
    "save_with, resume_with",
    [
        (
            ["--devices", "2", "--strategy", "fsdp", "--batch-size", "8"],
            ["--devices", "2", "--strategy", "fsdp", "--batch-size", "8"],
        ),
        (
            ["--devices", "2", "--strategy", "ddp", "--batch-size", "8"],
            ["--devices", "2", "--strategy", "fsdp", "--batch-size", "8"],
        ),
        pytest.param(
            ["--devices", "2", "--strategy", "fsdp", "--batch-size", "8"],
            ["--devices", "1", "--batch-size", "16"],
            marks=pytest.mark.fast,
        ),
        (["--devices", "1", "--batch-size", "16"], ["--devices", "2", "--strategy", "fsdp", "--batch-size", "8"]),
        (
            ["--devices", "2", "--strategy", "fsdp", "--batch-size", "8"],
            ["--devices", "4", "--strategy", "fsdp", "--batch-size", "4"],
        ),
        (
            ["--devices", "2", "--strategy", "fsdp", "--batch-size", "8"],
            ["--devices", "2", "--strategy", "ddp", "--batch-size", "8"],
        ),
    ],
    ids=["fsdp->fsdp", "ddp->fsdp", "fsdp(2)->single(1)", "single(1)->fsdp(2)", "fsdp(2)->fsdp(4)", "fsdp->ddp"],
)
def test_resume_continues_the_loss_curve(uninterrupted, tmp_path, save_with, resume_with):
    assert_ok(run_script("train_gpt.py", tmp_path, *save_with, "--stop-at", "5", "--save-at-end"))
    assert (tmp_path / "checkpoints" / "last").read_text() == "step=5"
    resumed = assert_ok(
        run_script("train_gpt.py", tmp_path, *resume_with, "--max-steps", "10", "--ckpt-path", "last")
    ).result()
    assert resumed["steps"] == list(range(6, 11))
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][5:], abs=1e-5)
    assert resumed["weight_checksum"] == pytest.approx(uninterrupted["weight_checksum"], rel=1e-5)


def test_kill_9_in_the_middle_of_a_save_keeps_the_last_checkpoint(uninterrupted, tmp_path):
    run = run_script(
        "train_gpt.py",
        tmp_path,
        "--devices",
        "2",
        "--strategy",
        "fsdp",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "3",
        "--kill-in-save",
        "6",
        timeout=120,
    )
    assert run.returncode != 0 and "rank 1 failed (signal 9)" in run.output
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "last").read_text() == "step=3"
    partial = checkpoints / ".step=6.partial"
    assert partial.is_dir() and not (partial / "meta.json").exists() and not (checkpoints / "step=6").exists()
    resumed = assert_ok(
        run_script(
            "train_gpt.py", tmp_path, "--devices", "2", "--strategy", "fsdp", "--batch-size", "8", "--ckpt-path", "last"
        )
    ).result()
    assert resumed["steps"] == list(range(4, 11))
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][3:], abs=1e-5)


@pytest.mark.parametrize("strategy", [pytest.param("fsdp", marks=pytest.mark.fast), "model_parallel"])
def test_async_save_writes_what_sync_save_writes(tmp_path, strategy):
    import json

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    result = assert_ok(run_script("async_save.py", tmp_path, "--strategy", strategy)).result()
    assert all(loss == loss for loss in result["losses"]), "training went on while the files were written"
    tensors = {}
    for name in ("sync", "async"):
        assert (tmp_path / name / "meta.json").is_file() and not (tmp_path / f".{name}.partial").exists()
        dcp_to_torch_save(tmp_path / name, tmp_path / f"{name}.pt")
        tensors[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    flat_sync = {k: v for k, v in _flatten(tensors["sync"]).items() if not k.startswith("rng")}
    flat_async = {k: v for k, v in _flatten(tensors["async"]).items() if not k.startswith("rng")}
    assert flat_sync.keys() == flat_async.keys() and len(flat_sync) > 10
    for key, value in flat_sync.items():
        assert torch.equal(value, flat_async[key]) if torch.is_tensor(value) else value == flat_async[key], key
    sync_meta = json.loads((tmp_path / "sync" / "meta.json").read_text())
    async_meta = json.loads((tmp_path / "async" / "meta.json").read_text())
    # Both record every file they wrote; their CRCs differ (each rank's RNG state is saved with the tensors).
    assert (
        set(sync_meta.pop("checksums"))
        == set(async_meta.pop("checksums"))
        == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    )
    del sync_meta["meta_crc32"], async_meta["meta_crc32"]
    assert sync_meta == async_meta


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}
