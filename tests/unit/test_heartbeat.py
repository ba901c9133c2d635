"""The hang report's judgement (which rank the others wait for) on the states ranks answer with, the default hang
timeout, and the setting's check before any process starts. The reports of real hangs: tests/distributed/test_hangs.py."""

import pytest
import torch

from shardtrain import Trainer
from shardtrain.errors import ConfigError
from shardtrain.launch.heartbeat import RankState, default_hang_timeout, format_report, stuck_ranks


def _state(rank, step=3, phase="training_step", function="_engine_run_backward", in_pytorch=True, caller=""):
    return RankState(
        rank=rank, step=step, phase=phase, stack="  File x\n", innermost=f"f.py:1 in {function}",
        in_pytorch=in_pytorch, function=function, caller=caller,
    )  # fmt: skip


def test_a_rank_behind_the_others_step_is_named_first():
    states = [_state(0), _state(1, step=2, phase="data", in_pytorch=False, function="__getitem__"), _state(2)]
    assert stuck_ranks(states) == ([1], "at step 2, behind the others (step 3)")


def test_a_rank_outside_pytorch_while_the_others_wait_inside_is_named():
    states = [_state(0), _state(1, function="training_step", in_pytorch=False), _state(2), _state(3)]
    ranks, why = stuck_ranks(states)
    assert ranks == [1] and why.startswith("not in a collective")


def test_ranks_in_different_collectives_name_no_rank_but_say_so():
    ranks, why = stuck_ranks([_state(0, function="barrier"), _state(1)])
    assert ranks == [] and why.startswith("the ranks wait in different PyTorch calls")


def test_a_lone_phase_among_several_ranks_is_named_and_a_tie_of_two_is_not():
    odd = [_state(0), _state(1), _state(2, phase="checkpoint")]
    assert stuck_ranks(odd) == ([2], "in 'checkpoint', where no other rank is")
    assert stuck_ranks([_state(0), _state(1, phase="checkpoint")]) == ([], "every rank is at the same place")


def test_the_report_puts_the_stuck_rank_first_with_where_it_was_called():
    text = format_report(
        "no rank made progress for 9 s (hang_timeout)",
        [_state(0), _state(1, function="training_step", in_pytorch=False, caller="t.py:48 in training_step: sleep()")],
    )
    lines = text.splitlines()
    assert lines[0] == "[shardtrain] hang: no rank made progress for 9 s (hang_timeout)."
    assert lines[1].startswith("[shardtrain] the others wait for rank 1: ")
    assert lines[2] == (
        "rank 1: step 3, training_step, in training_step, called from t.py:48 in training_step: sleep()  <- stuck"
    )
    assert lines[4].startswith("rank 0: step 3, training_step, in _engine_run_backward")


def test_the_default_hang_timeout_comes_before_the_collective_timeout():
    assert default_hang_timeout(1800) == 1740 and default_hang_timeout(60) == 48


@pytest.mark.parametrize("value", [0, -5])
def test_a_hang_timeout_that_is_not_positive_is_refused_before_any_process(value):
    with pytest.raises(ConfigError, match=r"hang_timeout_seconds must be a number of seconds > 0"):
        Trainer(accelerator="cpu", devices=2, strategy="ddp", hang_timeout_seconds=value, logger=False)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("options", [{"threshold": 0}, {"patience": 0}])
def test_straggler_monitor_settings_are_checked(options):
    from shardtrain import StragglerMonitor

    with pytest.raises(ValueError, match=r"StragglerMonitor needs threshold > 0 and patience >= 1"):
        StragglerMonitor(**options)
