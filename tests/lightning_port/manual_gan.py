"""Manual optimization as a Lightning user writes a GAN: two optimizers, two backward calls per step,
toggle_optimizer, clip_gradients, a scheduler stepped by hand; and a one-optimizer module (DeepSpeed's case).

``experiment`` fits, records the hooks, the logged rows, global_step, the learning rates and the weights;
with ``resume=True`` it stops after ``max_steps`` and fits again from the checkpoint (``ckpt_path``).
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import RecordingLogger, weights

HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
)


class Recorder:
    def _record_hooks(self) -> None:
        self.calls: list[str] = []
        for hook in HOOKS:
            setattr(self, hook, self._recorder(hook))

    def _recorder(self, hook):
        def record(*args, **kwargs):
            self.calls.append(hook)

        return record


class GAN(Recorder, L.LightningModule):
    def __init__(self, clip: str = "norm") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.clip = clip
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self._record_hooks()
        self.requires_grad_seen: list[list[bool]] = []

    def training_step(self, batch, batch_idx):
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        z = torch.randn(real.shape[0], 2, generator=torch.Generator().manual_seed(batch_idx))
        # discriminator: real vs detached fakes
        self.toggle_optimizer(d_opt)
        self.requires_grad_seen.append([p.requires_grad for p in self.parameters()])
        fake = self.generator(z)
        d_real = self.discriminator(real)
        d_fake = self.discriminator(fake.detach())
        d_loss = nn.functional.softplus(-d_real).mean() + nn.functional.softplus(d_fake).mean()
        self.manual_backward(d_loss)
        self.clip_gradients(d_opt, gradient_clip_val=0.05, gradient_clip_algorithm=self.clip)
        d_opt.step()
        d_opt.zero_grad()
        self.untoggle_optimizer(d_opt)
        # generator: fool the discriminator (two backward calls, accumulated)
        self.toggle_optimizer(g_opt)
        for half in fake.chunk(2):
            self.manual_backward(nn.functional.softplus(-self.discriminator(self.generator(z)[: len(half)])).mean())
        g_opt.step()
        g_opt.zero_grad()
        self.untoggle_optimizer(g_opt)
        self.lr_schedulers().step()
        self.log("d_loss", d_loss)
        self.log("g_lr", g_opt.param_groups[0]["lr"], prog_bar=True)

    def configure_optimizers(self):
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=0.01)
        d_opt = torch.optim.SGD(self.discriminator.parameters(), lr=0.1, momentum=0.9)
        return [g_opt, d_opt], [torch.optim.lr_scheduler.StepLR(g_opt, step_size=2, gamma=0.5)]


class OneOptimizer(Recorder, L.LightningModule):
    """Manual optimization with one optimizer (what Lightning allows under DeepSpeed)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self._record_hooks()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt = self.optimizers()
        loss = nn.functional.mse_loss(self.net(x), x.sum(dim=1, keepdim=True).sin())
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        self.log("loss", loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)  # ZeRO refuses SGD unless zero_allow_untested_optimizer


class RetainGraph(OneOptimizer):
    """Two backward passes through one graph: ``manual_backward``'s ``retain_graph=True`` reaches the backward, and
    an overridden ``backward`` hook is what runs (it adds a penalty's gradient)."""

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt = self.optimizers()
        loss = nn.functional.mse_loss(self.net(x), x.sum(dim=1, keepdim=True).sin())
        self.manual_backward(loss, retain_graph=True)
        self.manual_backward(loss * 0.5)
        opt.step()
        opt.zero_grad()
        self.log("loss", loss)

    def backward(self, loss, *args, **kwargs):
        self.calls.append(f"backward{sorted(kwargs)}")
        loss.backward(*args, **kwargs)


MODELS = {"gan": lambda: GAN(), "one": lambda: OneOptimizer(), "retain_graph": lambda: RetainGraph()}


def data(n: int = 32) -> TensorDataset:
    return TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(0)))


def experiment(root: str, model: str = "gan", resume: bool = False, max_steps: int = -1, **trainer_kwargs) -> dict:
    torch.manual_seed(0)
    module = MODELS[model]()
    logger = RecordingLogger()
    records: dict = {}

    def loader(trainer):  # under several processes Lightning shuffles the training data even without shuffle=True
        return DataLoader(data(), batch_size=8, shuffle=trainer.world_size > 1)

    if resume:
        first = L.Trainer(default_root_dir=root, logger=False, max_steps=max_steps, **trainer_kwargs)
        first.fit(module, loader(first))
        path = f"{root}/mid.ckpt"
        first.save_checkpoint(path)
        records["first_global_step"] = first.global_step
        torch.manual_seed(1)
        module = MODELS[model]()  # other weights: the checkpoint must restore them
        trainer = L.Trainer(default_root_dir=root, logger=logger, max_epochs=2, log_every_n_steps=1, **trainer_kwargs)
        trainer.fit(module, loader(trainer), ckpt_path=path)
    else:
        trainer = L.Trainer(
            default_root_dir=root,
            logger=logger,
            max_epochs=2,
            max_steps=max_steps,
            log_every_n_steps=1,
            **trainer_kwargs,
        )
        trainer.fit(module, loader(trainer))
    optimizers = module.optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    return {
        **records,
        "calls": module.calls,
        "rows": logger.rows,
        "weights": weights(module),
        "global_step": trainer.global_step,
        "lrs": [opt.param_groups[0]["lr"] for opt in optimizers],
        "requires_grad": getattr(module, "requires_grad_seen", [])[:2],
    }
