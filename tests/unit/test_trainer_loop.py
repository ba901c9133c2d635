"""The Trainer's loop in one process: accumulation, clipping, validation, seeding, schedulers, resume."""

import csv
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Callback, TrainModule, Trainer


class Regression(TrainModule):
    def __init__(self, scheduler_interval=None):
        super().__init__()
        self.scheduler_interval = scheduler_interval

    def configure_model(self):
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("my_metric", loss * 2)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if self.scheduler_interval is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def _fit(tmp_path, batch_size=16, module=None, **kwargs):
    module = module or Regression()
    kwargs.setdefault("max_steps", 4)
    trainer = Trainer(
        accelerator="cpu", default_root_dir=tmp_path, log_every_n_steps=1, seed=7, enable_progress_bar=False, **kwargs
    )
    val = kwargs.get("val_check_interval") is not None or "check_val_every_n_epoch" in kwargs
    trainer.fit(
        module, DataLoader(_data(), batch_size=batch_size), DataLoader(_data(16, seed=1), batch_size=4) if val else None
    )
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    return trainer, module, rows


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_accumulation_equals_larger_batch(tmp_path):
    _, big, big_rows = _fit(tmp_path / "big", batch_size=16)
    _, acc, acc_rows = _fit(tmp_path / "acc", batch_size=4, accumulate_grad_batches=4)
    assert torch.allclose(_weights(big), _weights(acc), atol=1e-6)
    big_loss = [float(r["train_loss"]) for r in big_rows]
    acc_loss = [float(r["train_loss"]) for r in acc_rows]
    assert len(big_loss) == len(acc_loss) == 4
    assert big_loss == pytest.approx(acc_loss, abs=1e-6)


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    _, a, _ = _fit(tmp_path / "a")
    _, b, _ = _fit(tmp_path / "b")
    assert torch.equal(_weights(a), _weights(b))
    trainer = Trainer(
        accelerator="cpu", max_steps=4, default_root_dir=tmp_path / "c", seed=8, enable_progress_bar=False
    )
    c = Regression()
    trainer.fit(c, DataLoader(_data(), batch_size=16))
    assert not torch.equal(_weights(a), _weights(c))


class NormProbe(Callback):
    def __init__(self):
        self.before, self.after = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.before.append(torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # after the step (and clipping)
        grads = torch.cat([p.grad.flatten() for p in module.parameters()])
        self.after.append((grads.norm().item(), grads.abs().max().item()))


def test_clip_by_norm(tmp_path):
    probe = NormProbe()
    _, _, rows = _fit(tmp_path, gradient_clip_val=0.05, callbacks=[probe])
    assert all(before > 0.05 for before in probe.before), "the test needs gradients larger than the clip"
    assert [norm for norm, _ in probe.after] == pytest.approx([0.05] * 4, rel=1e-4)
    assert [float(r["train_grad_norm"]) for r in rows] == pytest.approx(probe.before, rel=1e-5)


def test_clip_by_value(tmp_path):
    probe = NormProbe()
    _fit(tmp_path, gradient_clip_val=0.01, gradient_clip_algorithm="value", callbacks=[probe])
    assert all(largest <= 0.01 + 1e-9 for _, largest in probe.after)


@pytest.mark.parametrize("interval, expected_lr", [("step", 0.1 * 0.5**5), ("epoch", 0.1 * 0.5**1)])
def test_scheduler_interval(tmp_path, interval, expected_lr):
    # 64 samples / batch 16 = 4 steps per epoch; 5 steps = one epoch and one step.
    trainer, _, _ = _fit(tmp_path, module=Regression(scheduler_interval=interval), max_steps=5)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected_lr)


def test_validation_every_n_batches_and_limit(tmp_path):
    calls = []

    class Count(Callback):
        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx):
            calls.append((trainer.global_step, batch_idx))

    _, module, rows = _fit(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=3, callbacks=[Count()])
    assert calls == [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2)]  # the sanity check first
    val_rows = [r for r in rows if r.get("val_loss")]
    assert [int(r["step"]) for r in val_rows] == [1, 3]  # the step of the batch that validated
    # logged value = mean over the 3 batches
    x, y = _data(16, seed=1).tensors
    with torch.no_grad():
        expected = (
            sum(torch.nn.functional.mse_loss(module.net(x[i * 4 : i * 4 + 4]), y[i * 4 : i * 4 + 4]) for i in range(3))
            / 3
        )
    assert float(val_rows[-1]["val_loss"]) == pytest.approx(expected.item(), rel=1e-5)


def test_epoch_end_validation_and_max_epochs(tmp_path):
    trainer, _, rows = _fit(tmp_path, max_steps=-1, max_epochs=2, check_val_every_n_epoch=1)
    assert trainer.global_step == 8 and trainer.current_epoch == 2
    assert [int(r["step"]) for r in rows if r.get("val_loss")] == [3, 7]
    assert {"my_metric", "train_loss", "epoch"} <= set(rows[0])


def test_validate_returns_metrics(tmp_path):
    trainer = Trainer(accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False, seed=0)
    (metrics,) = trainer.validate(Regression(), DataLoader(_data(16), batch_size=4))
    assert set(metrics) == {"val_loss"} and math.isfinite(metrics["val_loss"])


def test_resume_continues_the_loss_curve(tmp_path):
    _, full, full_rows = _fit(tmp_path / "full", max_steps=6, batch_size=8)
    trainer, _, _ = _fit(tmp_path / "part", max_steps=3, batch_size=8)
    saved = trainer.save_checkpoint()
    assert (tmp_path / "part" / "checkpoints" / "last").read_text() == saved.name
    resumed = Trainer(
        accelerator="cpu",
        max_steps=6,
        default_root_dir=tmp_path / "part",
        log_every_n_steps=1,
        seed=7,
        enable_progress_bar=False,
    )
    module = Regression()
    resumed.fit(module, DataLoader(_data(), batch_size=8), ckpt_path="last")
    rows = list(csv.DictReader(open(tmp_path / "part" / "metrics.csv")))
    rows = rows[[r.get("resumed_from_step") for r in rows].index("3") + 1 :]  # the resumed run's rows, after the marker
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(
        [float(r["train_loss"]) for r in full_rows[3:]], abs=1e-7
    )
    assert torch.allclose(_weights(module), _weights(full), atol=1e-7)


def test_max_steps_at_epoch_end_still_validates_and_counts_the_epoch(tmp_path):
    trainer, _, rows = _fit(tmp_path, max_steps=4, check_val_every_n_epoch=1)
    assert trainer.current_epoch == 1
    assert [int(r["step"]) for r in rows if r.get("val_loss")] == [3]


def test_max_steps_mid_epoch_does_not_end_the_epoch(tmp_path):
    trainer, _, _ = _fit(tmp_path, max_steps=3)
    assert (trainer.current_epoch, trainer.batches_seen_in_epoch) == (0, 3)


def test_model_checkpoint_rotation_keeps_the_newest_k(tmp_path):
    from shardtrain import ModelCheckpoint

    trainer, _, _ = _fit(
        tmp_path, max_steps=6, batch_size=8, callbacks=[ModelCheckpoint(every_n_train_steps=2, save_top_k=2)]
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step=4", "step=6"]
    assert (tmp_path / "checkpoints" / "last").read_text() == "step=6"


def test_model_checkpoint_keeps_the_best_by_metric(tmp_path):
    from shardtrain import ModelCheckpoint

    callback = ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1, save_on_train_end=False)
    trainer, _, rows = _fit(tmp_path, max_steps=6, batch_size=8, val_check_interval=2, callbacks=[callback])
    val = {int(r["step"]): float(r["val_loss"]) for r in rows if r.get("val_loss")}
    best_row = min(val, key=val.get)
    best_step = best_row + 1  # a row's step counts the batches before the one that validated; a checkpoint's, steps
    names = {p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()}
    assert names == {f"step={best_step}"}  # as Lightning: a validation that does not improve saves nothing
    assert callback.best_model_path.endswith(f"step={best_step}")
    assert callback.best_model_score == pytest.approx(val[best_row])
    assert (tmp_path / "checkpoints" / "last").read_text() == f"step={best_step}"


def test_resume_under_another_precision(tmp_path):
    trainer, _, _ = _fit(tmp_path, max_steps=2, batch_size=8)
    trainer.save_checkpoint()
    resumed = Trainer(
        accelerator="cpu",
        precision="16-mixed",
        max_steps=4,
        default_root_dir=tmp_path,
        seed=7,
        enable_progress_bar=False,
    )
    resumed.fit(Regression(), DataLoader(_data(), batch_size=8), ckpt_path="last")
    assert resumed.global_step == 4


class NaNAtStep2(Regression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)["loss"]
        return loss * float("nan") if batch_idx == 1 else loss


def test_on_nonfinite_skip_leaves_out_exactly_that_step(tmp_path, capsys):
    trainer, module, rows = _fit(tmp_path, module=NaNAtStep2(), on_nonfinite="skip")
    assert trainer.global_step == 4 and trainer.nonfinite.skipped_steps == 1
    assert "step 2: the loss is nan on rank 0" in capsys.readouterr().out
    # the same run by hand, without the second batch's update
    torch.manual_seed(7)
    reference = Regression()
    from shardtrain.seed import seed_everything

    seed_everything(7)
    reference.configure_model()
    optimizer = reference.configure_optimizers()
    for index, (x, y) in enumerate(DataLoader(_data(), batch_size=16)):
        if index == 1:
            continue
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(reference.net(x), y).backward()
        optimizer.step()
    assert torch.equal(_weights(module), _weights(reference))


def test_on_nonfinite_stop_names_the_step(tmp_path):
    from shardtrain import NonFiniteError

    with pytest.raises(
        NonFiniteError, match=r"step 2: the loss is nan on rank 0 and the gradient norm is nan\. .*on_nonfinite='skip'"
    ):
        _fit(tmp_path, module=NaNAtStep2(), on_nonfinite="stop")


def test_on_nonfinite_refuses_what_it_cannot_do(tmp_path):
    from shardtrain import ConfigError

    with pytest.raises(ConfigError, match="on_nonfinite must be one of 'ignore', 'stop', 'skip'"):
        Trainer(accelerator="cpu", on_nonfinite="drop")
    with pytest.raises(ConfigError, match="16-mixed.*GradScaler already skips"):
        _fit(tmp_path, on_nonfinite="skip", precision="16-mixed")


def test_resume_continues_the_learning_rate_schedule(tmp_path):
    """A step-interval StepLR: the resumed run's learning rates and weights are the uninterrupted run's."""
    full_trainer, full, _ = _fit(tmp_path / "full", module=Regression(scheduler_interval="step"), max_steps=6)
    part, _, _ = _fit(tmp_path / "part", module=Regression(scheduler_interval="step"), max_steps=3)
    part.save_checkpoint()
    resumed = Trainer(
        accelerator="cpu", max_steps=6, default_root_dir=tmp_path / "part", seed=7, enable_progress_bar=False
    )
    module = Regression(scheduler_interval="step")
    resumed.fit(module, DataLoader(_data(), batch_size=16), ckpt_path="last")
    assert resumed.global_step == 6 and full_trainer.global_step == 6
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)
    assert resumed.optimizers[0].optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)
    assert torch.allclose(_weights(module), _weights(full), atol=1e-7)
