"""Every configure_optimizers form Lightning documents, and when schedulers step."""

import pytest
import torch

from shardtrain import ConfigError
from shardtrain.optimization import parse_optimizers, step_schedulers


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_forms():
    a, b = _opt(), _opt()
    sched = torch.optim.lr_scheduler.StepLR(a, 1)
    assert parse_optimizers(a) == ([a], [])
    opts, scheds = parse_optimizers((a, sched))
    assert opts == [a] and scheds[0].scheduler is sched and scheds[0].interval == "epoch"
    opts, scheds = parse_optimizers(([a, b], [sched]))
    assert opts == [a, b] and len(scheds) == 1
    opts, scheds = parse_optimizers(
        {"optimizer": a, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}
    )
    assert opts == [a] and (scheds[0].interval, scheds[0].frequency) == ("step", 2)
    assert parse_optimizers([a, b]) == ([a, b], [])


@pytest.mark.parametrize("bad", [None, "adam", {"lr_scheduler": None}, [1, 2]])
def test_bad_forms(bad):
    with pytest.raises(ConfigError):
        parse_optimizers(bad)


def test_bad_interval():
    a = _opt()
    with pytest.raises(ConfigError, match="interval"):
        parse_optimizers(
            {"optimizer": a, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(a, 1), "interval": "batch"}}
        )


def test_step_frequency_and_interval():
    a = _opt()
    sched = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
    _, configs = parse_optimizers(
        {"optimizer": a, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}
    )
    for count in range(1, 5):
        a.step()
        step_schedulers(configs, "epoch", count, {})  # wrong interval: never steps
        step_schedulers(configs, "step", count, {})
    assert a.param_groups[0]["lr"] == pytest.approx(0.25)  # stepped at counts 2 and 4


def test_monitor_needs_logged_metric():
    a = _opt()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(a)
    _, configs = parse_optimizers({"optimizer": a, "lr_scheduler": plateau, "monitor": "val_loss"})
    with pytest.raises(ConfigError, match="val_loss"):
        step_schedulers(configs, "epoch", 1, {"train_loss": 1.0})
    step_schedulers(configs, "epoch", 1, {"val_loss": 1.0})
