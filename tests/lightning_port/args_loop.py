"""Lightning's loop arguments and loop details, as a Lightning user meets them: which hooks run in which order
(sanity check, zero_grad, early stops), which batches each stage sees, what the trainer says in the hooks."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import RecordingLogger, weights

MODULE_HOOKS = (  # recorded by name; on_train_start, on_train_batch_start/_end record more below
    "on_fit_start",
    "on_train_epoch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_validation_end",
    "on_train_end",
    "on_fit_end",
)
CALLBACK_HOOKS = ("on_sanity_check_start", "on_sanity_check_end", "on_train_epoch_end", "on_validation_end")


def _flags(trainer) -> str:
    names = ("sanity_checking", "training", "validating", "testing", "predicting")
    return ",".join(name for name in names if getattr(trainer, name))


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []
        for hook in CALLBACK_HOOKS:
            setattr(self, hook, self._recorder(hook))

    def _recorder(self, hook):
        def record(trainer, module, *args):
            self.calls.append(f"{hook}:{_flags(trainer)}:{trainer.current_epoch}:{trainer.global_step}")

        return record


class Looped(L.LightningModule):
    def __init__(self, stop_at_step: int | None = None, skip_at: int | None = None, shuffle: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.stop_at_step, self.skip_at, self.shuffle = stop_at_step, skip_at, shuffle
        self.calls: list[str] = []
        self.train_batches: list[float] = []  # each training batch's sum: which samples were seen
        self.val_batches: list[str] = []  # flags and batch sum of each validation batch
        self.seen: dict = {}
        self.loaders_made = 0
        for hook in MODULE_HOOKS:
            setattr(self, hook, self._recorder(hook))

    def _recorder(self, hook):
        def record(*args, **kwargs):
            self.calls.append(hook)

        return record

    def on_train_start(self):
        self.calls.append("on_train_start")
        trainer = self.trainer
        self.seen.update(
            num_training_batches=trainer.num_training_batches,
            num_val_batches=list(trainer.num_val_batches),
            max_epochs=trainer.max_epochs,
            estimated_stepping_batches=trainer.estimated_stepping_batches,
            lightning_module_is_self=trainer.lightning_module is self,
            stage=str(trainer.state.stage.value if hasattr(trainer.state.stage, "value") else trainer.state.stage),
            fn=str(trainer.state.fn.value if hasattr(trainer.state.fn, "value") else trainer.state.fn),
            flags=_flags(trainer),
        )

    def on_train_batch_start(self, batch, batch_idx):
        self.calls.append(f"on_train_batch_start:{batch_idx}:{self.trainer.is_last_batch}")
        if self.skip_at is not None and self.current_epoch == 0 and batch_idx == self.skip_at:
            return -1
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.calls.append("on_train_batch_end")
        if self.stop_at_step is not None and self.trainer.global_step >= self.stop_at_step:
            self.trainer.should_stop = True

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.calls.append(f"optimizer_zero_grad:{epoch}:{batch_idx}")
        optimizer.zero_grad()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_batches.append(round(float(x.sum()), 4))
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        mode = (
            "inference" if torch.is_inference_mode_enabled() else ("no_grad" if not torch.is_grad_enabled() else "grad")
        )
        self.val_batches.append(f"{_flags(self.trainer)}:{mode}:{round(float(x.sum()), 4)}")
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        self.seen["model_in_configure_optimizers"] = self.trainer.model is not None
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        self.loaders_made += 1
        return DataLoader(data(32), batch_size=8, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(data(16, seed=1), batch_size=8)


def data(n: int, seed: int = 0) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def experiment(
    root: str, stop_at_step: int | None = None, skip_at: int | None = None, shuffle: bool = False, **trainer_kwargs
) -> dict:
    torch.manual_seed(0)
    module = Looped(stop_at_step, skip_at, shuffle)
    logger = RecordingLogger()
    recorder = Recorder()
    options = {"max_epochs": 2, "log_every_n_steps": 1, **trainer_kwargs}
    trainer = L.Trainer(default_root_dir=root, logger=logger, callbacks=[recorder], **options)
    trainer.fit(module)
    return {
        "calls": module.calls,
        "callback_calls": recorder.calls,
        "train_batches": module.train_batches,
        "val_batches": module.val_batches,
        "seen": module.seen,
        "loaders_made": module.loaders_made,
        "rows": logger.rows,
        "weights": weights(module),
        "global_step": trainer.global_step,
        "should_stop": trainer.should_stop,
        "torch_flags": [torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark],
    }
