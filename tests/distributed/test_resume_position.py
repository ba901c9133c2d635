"""Resuming mid-epoch under 1 and 2 processes with shuffled data: no sample before the resume
point is loaded again, and the loss curve is the uninterrupted one (also from 1 process to 2)."""

import json

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed

# 512 samples, a global batch of 16: 32 batches per epoch; resume at step 28, end in the next epoch.
STOP, END, GLOBAL_BATCH = 28, 40, 16


def _loaded(directory):
    """Indices loaded per rank, in order, over every process that wrote into ``directory``."""
    by_rank = {}
    for path in sorted(directory.glob("loaded_rank*_*.json")):
        by_rank.setdefault(int(path.name.split("_")[1].removeprefix("rank")), []).append(json.loads(path.read_text()))
    return by_rank


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = assert_ok(run_script("resume_counting.py", out, "--devices", "2", "--max-steps", str(END))).result()
    return result, {rank: runs[0] for rank, runs in _loaded(out).items()}


@pytest.mark.parametrize("save_devices", [2, 1], ids=["ddp(2)->ddp(2)", "single(1)->ddp(2)"])
def test_shuffled_resume_loads_only_what_is_left_and_continues_the_curve(uninterrupted, tmp_path, save_devices):
    full, full_loaded = uninterrupted
    batch = str(GLOBAL_BATCH // save_devices)
    save = ("--devices", str(save_devices), "--batch-size", batch, "--max-steps", str(STOP), "--save-at-end")
    assert_ok(run_script("resume_counting.py", tmp_path, *save))
    (tmp_path / "first").mkdir()
    for path in tmp_path.glob("loaded_rank*.json"):
        path.rename(tmp_path / "first" / path.name)
    resumed = assert_ok(
        run_script("resume_counting.py", tmp_path, "--devices", "2", "--max-steps", str(END), "--ckpt-path", "last")
    ).result()
    assert resumed["steps"] == list(range(STOP + 1, END + 1))
    assert resumed["losses"] == pytest.approx(full["losses"][STOP:], abs=1e-6)
    per_rank = GLOBAL_BATCH // 2
    for rank, (loaded,) in _loaded(tmp_path).items():
        # each rank loads exactly what the uninterrupted run loaded after step STOP, and nothing before
        assert loaded == full_loaded[rank][STOP * per_rank :]


def test_a_stateful_dataloader_over_a_stream_resumes_on_two_processes_without_rereading(tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    stream = ("--devices", "2", "--batch-size", str(GLOBAL_BATCH // 2), "--stream")
    full = assert_ok(run_script("resume_counting.py", tmp_path / "full", *stream, "--max-steps", str(END))).result()
    full_loaded = {rank: runs[0] for rank, runs in _loaded(tmp_path / "full").items()}
    assert_ok(run_script("resume_counting.py", tmp_path, *stream, "--max-steps", str(STOP), "--save-at-end"))
    for path in tmp_path.glob("loaded_rank*.json"):
        path.unlink()
    resumed = assert_ok(
        run_script("resume_counting.py", tmp_path, *stream, "--max-steps", str(END), "--ckpt-path", "last")
    ).result()
    assert resumed["steps"] == list(range(STOP + 1, END + 1))
    assert resumed["losses"] == pytest.approx(full["losses"][STOP:], abs=1e-6)
    for rank, (loaded,) in _loaded(tmp_path).items():
        assert loaded[0] == STOP * GLOBAL_BATCH + rank  # each rank's stream continued where it was
        assert loaded == full_loaded[rank][STOP * GLOBAL_BATCH // 2 :]
