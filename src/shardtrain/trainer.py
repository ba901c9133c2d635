"""The Trainer: the training loop, with accumulation, clipping, validation, logging and callbacks.

It knows nothing of strategies: every device, sharding and precision decision goes through the
:class:`~shardtrain.engine.Engine` it owns. ``batch_size`` of a DataLoader is per process, as in
Lightning: the global batch is ``batch_size * world_size * accumulate_grad_batches``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch.utils.data import DataLoader

from shardtrain.callbacks import Callback, ProgressBar, RunSummary
from shardtrain.engine import Engine
from shardtrain.errors import ConfigError, TrainingStepError
from shardtrain.loggers import Logger
from shardtrain.metrics import MetricCollector
from shardtrain.module import TrainModule
from shardtrain.nonfinite import NonFiniteCheck
from shardtrain.optimization import SchedulerConfig, parse_optimizers, step_schedulers
from shardtrain.preemption import Preempted, Preemption, SignalCatcher, requeue_slurm_job, running_under_slurm_batch
from shardtrain.seed import seed_everything
from shardtrain.strategies import Strategy
from shardtrain.trainer_arguments import check_limit, check_positive_int, limited_batches, make_loggers
from shardtrain.trainer_checkpoint import TrainerCheckpointing
from shardtrain.trainer_validation import TrainerValidation
from shardtrain.wrapper import EngineModule

log = logging.getLogger(__name__)


class Trainer(TrainerCheckpointing, TrainerValidation):
    """Fit a :class:`TrainModule` on any strategy with one line of configuration.

    Args:
        accelerator: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        devices: processes per node (one per GPU on CUDA); ``"auto"``: what torchrun or SLURM started,
            else every visible GPU on CUDA and one process on the CPU. Under torchrun or SLURM a
            number that differs from the launcher's layout is an error.
        num_nodes: machines in the run (under torchrun or SLURM, it must match theirs).
        strategy: a registered name (see ``available_strategies()``), ``"auto"``, or a ``Strategy`` object.
        precision: ``"32-true"``, ``"bf16-mixed"``, ``"bf16-true"`` or ``"16-mixed"`` (see docs/precision.md).
        max_steps: optimizer steps to train for (``-1``: no limit, use ``max_epochs``).
        max_epochs: passes over the training data (default 1000 when neither limit is set, as in Lightning).
        accumulate_grad_batches: micro-batches per optimizer step; gradients are synchronised
            only on the last one.
        gradient_clip_val: clip gradients to this norm (or value, see ``gradient_clip_algorithm``).
        gradient_clip_algorithm: ``"norm"`` (of the whole gradient, across shards) or ``"value"``.
        val_check_interval: ``None``: validate at the end of each epoch; an int ``n``: every ``n``
            training batches; a float ``f`` in (0, 1]: every ``f`` of an epoch.
        check_val_every_n_epoch: with end-of-epoch validation, every this many epochs.
        limit_train_batches: at most this many training batches (int) or this fraction (float) per epoch.
        limit_val_batches: at most this many validation batches (int) or this fraction (float) per run.
        log_every_n_steps: how often training metrics are reduced over ranks and written.
        default_root_dir: where logs (``metrics.csv``) and checkpoints go.
        callbacks: extra :class:`Callback` objects.
        logger: ``True`` (a CSV logger in ``default_root_dir``), ``False``, or logger objects.
        seed: seed every rank with this before building the model (same initial weights everywhere).
        enable_progress_bar: rank-0 progress bar with loss and tokens/s.
        enable_model_summary: before the first step, print on rank 0 the parameter count, strategy,
            layout, precision and where logs and checkpoints go (:class:`~shardtrain.callbacks.RunSummary`).
        timeout_seconds: how long a collective waits for the other ranks before the run fails.
        preemption: what to do when the cluster sends a stop signal (default: on SIGTERM or
            SIGUSR1, save a checkpoint at the next agreed step, requeue under SLURM, exit with
            code 75); a :class:`~shardtrain.preemption.Preemption`, or ``False`` to leave signals alone.
        on_nonfinite: ``"ignore"``, ``"stop"`` (raise ``NonFiniteError`` naming the step and
            ranks) or ``"skip"`` (leave the optimizer step out) when a step's loss or gradient
            norm is NaN/Inf; the checks cost one small collective and host sync per step.
    """

    def __init__(
        self,
        *,
        accelerator: str = "auto",
        devices: int | Literal["auto"] = "auto",
        num_nodes: int = 1,
        strategy: str | Strategy = "auto",
        precision: str | int = "32-true",
        max_steps: int = -1,
        max_epochs: int | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int = 1,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        log_every_n_steps: int = 50,
        default_root_dir: str | os.PathLike = "runs",
        callbacks: Sequence[Callback] | Callback | None = None,
        logger: bool | Logger | Sequence[Logger] = True,
        seed: int | None = None,
        enable_progress_bar: bool = True,
        enable_model_summary: bool = True,
        timeout_seconds: float = 1800.0,
        preemption: Preemption | bool = True,
        on_nonfinite: str = "ignore",
    ) -> None:
        check_positive_int("accumulate_grad_batches", accumulate_grad_batches)
        check_positive_int("log_every_n_steps", log_every_n_steps)
        check_positive_int("check_val_every_n_epoch", check_val_every_n_epoch)
        if max_steps != -1:
            check_positive_int("max_steps", max_steps, "or -1 for no limit")
        if max_epochs is not None:
            check_positive_int("max_epochs", max_epochs)
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ConfigError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ConfigError(f"gradient_clip_val must be > 0 (or None to disable), got {gradient_clip_val}")
        check_limit("val_check_interval", val_check_interval)
        check_limit("limit_train_batches", limit_train_batches)
        check_limit("limit_val_batches", limit_val_batches, allow_zero=True)
        if not isinstance(preemption, (bool, Preemption)):
            raise ConfigError(f"preemption must be True, False or a shardtrain.Preemption, got {preemption!r}")

        self.config: dict[str, Any] = {  # the resolved arguments, written into every checkpoint
            "accelerator": accelerator,
            "devices": devices,
            "num_nodes": num_nodes,
            "strategy": strategy if isinstance(strategy, str) else repr(strategy),
            "precision": str(precision),
            "max_steps": max_steps,
            "max_epochs": max_epochs,
            "accumulate_grad_batches": accumulate_grad_batches,
            "gradient_clip_val": gradient_clip_val,
            "gradient_clip_algorithm": gradient_clip_algorithm,
            "val_check_interval": val_check_interval,
            "check_val_every_n_epoch": check_val_every_n_epoch,
            "limit_train_batches": limit_train_batches,
            "limit_val_batches": limit_val_batches,
            "log_every_n_steps": log_every_n_steps,
            "default_root_dir": str(default_root_dir),
            "seed": seed,
            "timeout_seconds": timeout_seconds,
            "preemption": repr(preemption),
            "on_nonfinite": on_nonfinite,
        }
        self.auto_strategy = isinstance(strategy, str) and strategy == "auto"
        self.engine = Engine(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            precision=precision,
            timeout_seconds=timeout_seconds,
        )
        self.engine.configure_training(
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )
        self.max_steps = max_steps
        self.max_epochs = max_epochs if max_epochs is not None else (1000 if max_steps == -1 else None)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.log_every_n_steps = log_every_n_steps
        self.default_root_dir = Path(default_root_dir)
        self.seed = seed
        self.preemption: Preemption | None = Preemption() if preemption is True else (preemption or None)
        self._signals = SignalCatcher(())
        self.nonfinite = NonFiniteCheck(on_nonfinite)
        self._stop_agreed = False
        self._last_checkpoint: tuple[int, Path] | None = None  # (global step, path) of the latest save
        self.callbacks: list[Callback] = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        if enable_progress_bar and not any(isinstance(cb, ProgressBar) for cb in self.callbacks):
            self.callbacks.append(ProgressBar())
        if enable_model_summary and not any(isinstance(cb, RunSummary) for cb in self.callbacks):
            self.callbacks.insert(0, RunSummary())
        self.loggers: list[Logger] = make_loggers(logger, self.default_root_dir)

        self.global_step = 0
        self.current_epoch = 0
        self.batches_seen_in_epoch = 0
        self.callback_metrics: dict[str, float] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.should_stop = False
        self.estimated_stepping_batches: int | float = math.inf
        self.module: TrainModule | None = None
        self.model: EngineModule | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_schedulers: list[SchedulerConfig] = []

    # ------------------------------------------------------------------ public API
    @property
    def strategy(self) -> Strategy:
        return self.engine.strategy

    @property
    def global_rank(self) -> int:
        return self.engine.global_rank

    @property
    def world_size(self) -> int:
        return self.engine.world_size

    @property
    def is_global_zero(self) -> bool:
        return self.engine.is_global_zero

    def init_module(self) -> Any:
        """Context for building a model outside ``configure_model`` where the strategy wants it."""
        self.engine.launch()
        return self.engine.init_module()

    def fit(
        self,
        module: TrainModule,
        train_dataloaders: DataLoader | None = None,
        val_dataloaders: DataLoader | None = None,
        ckpt_path: str | os.PathLike | None = None,
    ) -> None:
        """Train ``module``; resume from ``ckpt_path`` (a file saved by ``save_checkpoint``, or ``"last"``).

        Raises :class:`~shardtrain.preemption.Preempted` (exit code 75) on every rank after
        saving a checkpoint, when a preemption signal arrived (see ``preemption``).
        """
        self._signals = SignalCatcher(self.preemption.signal_numbers if self.preemption else ())
        self._signals.install()
        self._stop_agreed = False
        try:
            self.engine.launch()
            self._attach(module, "fit")
        except BaseException:
            self._signals.uninstall()
            raise
        try:
            train_loader = self._loader(train_dataloaders, module, "train_dataloader", required=True)
            self._train_loader = train_loader  # a StatefulDataLoader's position goes into checkpoints
            val_loader = self._loader(val_dataloaders, module, "val_dataloader", required=False)
            self._estimate_steps(train_loader)
            self.engine.configure_training(
                accumulate_grad_batches=self.accumulate_grad_batches,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
                micro_batch_size=getattr(train_loader, "batch_size", None),
            )
            self._setup(module, "fit")
            self.nonfinite.refuse_what_cannot_be_done(self.strategy.can_skip_optimizer_step, self._loss_scaling())
            if ckpt_path is not None:
                self._restore(ckpt_path)
            self._call("on_fit_start")
            self._train(train_loader, val_loader)
            self._call("on_fit_end")
        except BaseException as exception:
            self._call("on_exception", exception)
            peer_failure = self.engine.explain_failure(exception)
            if peer_failure is not None:
                raise peer_failure from exception
            raise
        finally:
            self._signals.uninstall()
            self.engine.wait_for_checkpoint()
            for logger in self._rank_zero_loggers():
                logger.finalize()
            self._teardown(module, "fit")

    def validate(self, module: TrainModule, dataloaders: DataLoader | None = None) -> list[dict[str, float]]:
        """Run the validation loop once; returns the metrics averaged over batches and ranks."""
        self.engine.launch()
        self._attach(module, "validate")
        try:
            self._setup(module, "validate")
            loader = self._loader(dataloaders, module, "val_dataloader", required=True)
            metrics = self._validate(loader)
            for logger in self._rank_zero_loggers():
                logger.finalize()
        finally:
            self._teardown(module, "validate")
        return [metrics]

    def _teardown(self, module: TrainModule, stage: str) -> None:
        """Every callback's ``teardown(trainer, module, stage)``, then the engine's, as Lightning does.

        The set-up model stays readable (``save_checkpoint()`` after ``fit`` works); under DeepSpeed
        it can no longer run (see ``DeepSpeedStrategy.teardown``).
        """
        try:
            for callback in self.callbacks:
                callback.teardown(self, module, stage)
        finally:
            self.engine.teardown()

    # ------------------------------------------------------------------ set-up
    def _attach(self, module: TrainModule, stage: str) -> None:
        if not isinstance(module, TrainModule):
            raise ConfigError(f"Trainer.{stage} takes a shardtrain.TrainModule, got {type(module).__name__}")
        module._trainer = self

    def _setup(self, module: TrainModule, stage: str) -> None:
        """Set the model up once (a later stage on the same module reuses it); callbacks' ``setup`` runs every stage."""
        if not (self.module is module and self.model is not None):
            self._set_up_model(module, stage)
        for callback in self.callbacks:
            callback.setup(self, module, stage)

    def _set_up_model(self, module: TrainModule, stage: str) -> None:
        if self.auto_strategy:
            self._choose_strategy(module)
        if self.seed is not None:
            seed_everything(self.seed)
        with self.engine.init_module():
            module.configure_model()
        self.module = module
        if stage == "fit":

            def configure_optimizers() -> list[torch.optim.Optimizer]:
                optimizers, self.lr_schedulers = parse_optimizers(module.configure_optimizers())
                return optimizers

            self.model, self.optimizers = self.engine.setup_module_and_optimizers(module, configure_optimizers)
        else:
            self.model = self.engine.setup_module(module)

    def _choose_strategy(self, module: TrainModule) -> None:
        """``strategy="auto"``: pick from the memory estimate (see ``shardtrain.estimate``)."""
        from shardtrain.estimate import choose_strategy

        env = self.engine.environment
        name, reason = choose_strategy(
            module,
            devices=env.local_world_size,
            num_nodes=max(1, env.world_size // env.local_world_size),
            precision=self.engine.precision.name,
            device_type=self.engine.device.type,
        )
        self.engine.use_strategy(name)
        self.auto_strategy = False
        self.strategy_reason = reason
        if self.is_global_zero:
            log.info("strategy='auto' chose %s", reason)
            print(f"[shardtrain] strategy='auto' chose {reason}", flush=True)

    def _loader(self, given: DataLoader | None, module: TrainModule, hook: str, required: bool) -> Any:
        loader = (
            given if given is not None else (getattr(module, hook)() if callable(getattr(module, hook, None)) else None)
        )
        if loader is None:
            if required:
                raise ConfigError(
                    f"no {hook.replace('_', ' ')}: pass it to the Trainer or define {type(module).__name__}.{hook}()"
                )
            return None
        return self.engine.setup_dataloaders(loader, seed=self.seed or 0)

    def _estimate_steps(self, loader: Any) -> None:
        if self.max_steps > 0:
            self.estimated_stepping_batches = self.max_steps
            return
        try:
            batches = limited_batches(len(loader), self.limit_train_batches)
        except TypeError:
            return
        self.estimated_stepping_batches = self.max_epochs * math.ceil(batches / self.accumulate_grad_batches)

    # ------------------------------------------------------------------ training
    def _train(self, train_loader: Any, val_loader: Any) -> None:
        assert self.model is not None
        self.should_stop = self._reached_max_steps() or (
            self.max_epochs is not None and self.current_epoch >= self.max_epochs
        )
        self._call("on_train_start")
        while not self.should_stop:
            self.model.train()
            train_loader.set_epoch(self.current_epoch)
            self._call("on_train_epoch_start")
            if not self._train_epoch(train_loader, val_loader):
                break  # stopped mid-epoch (max_steps or should_stop): the epoch is not over
            self._call("on_train_epoch_end")
            self.current_epoch += 1
            self.batches_seen_in_epoch = 0
            step_schedulers(self.lr_schedulers, "epoch", self.current_epoch, self.callback_metrics)
            if self.max_epochs is not None and self.current_epoch >= self.max_epochs:
                self.should_stop = True
        self._call("on_train_end")

    def _train_epoch(self, train_loader: Any, val_loader: Any) -> bool:
        """Train until the epoch's data runs out (returns True) or training must stop (False)."""
        try:
            num_batches = limited_batches(len(train_loader), self.limit_train_batches)
        except TypeError:
            num_batches = math.inf
        interval = self._val_interval(num_batches)
        collector = MetricCollector(mean_over_batches=False)
        step_loss = torch.zeros((), device=self.engine.device)
        start = self.batches_seen_in_epoch  # resuming mid-epoch: these batches were already trained on
        train_loader.start_at(start)  # skipped by index, not loaded (see DeviceDataLoader)
        for batch_idx, batch in enumerate(train_loader, start=start):
            if batch_idx >= num_batches:
                break
            self._call("on_train_batch_start", batch, batch_idx)
            is_last = batch_idx + 1 == num_batches
            step_now = (batch_idx + 1) % self.accumulate_grad_batches == 0 or is_last
            loss, outputs = self._training_micro_step(batch, batch_idx, sync=step_now)
            step_loss += loss
            collector.update(self.module.pop_logged())
            self.batches_seen_in_epoch = batch_idx + 1
            if step_now:
                micro_batches = (batch_idx % self.accumulate_grad_batches) + 1
                self._optimizer_step(collector, step_loss / micro_batches)
                step_loss = torch.zeros((), device=self.engine.device)
            self._call("on_train_batch_end", outputs, batch, batch_idx)
            if val_loader is not None and interval and (batch_idx + 1) % interval == 0 and self._val_epoch_due():
                self._validate(val_loader)
            if self._stop_agreed and not self._reached_max_steps():  # on the last step, just finish
                self._stop_for_preemption()
            if self._reached_max_steps() or self.should_stop:
                self.should_stop = True
                if self.batches_seen_in_epoch < num_batches:
                    return False
                break
        if val_loader is not None and interval == 0 and self._val_epoch_due():
            self._validate(val_loader)
        return True

    def _training_micro_step(self, batch: Any, batch_idx: int, sync: bool) -> tuple[torch.Tensor, Any]:
        with self.engine.no_backward_sync(self.model, enabled=not sync):
            outputs = self.model.training_step(*self.module._step_arguments("training_step", batch, batch_idx))
            loss = _extract_loss(outputs, type(self.module).__name__)
            self._call("on_before_backward", loss)
            self.engine.backward(
                loss / self.accumulate_grad_batches if self.accumulate_grad_batches > 1 else loss, self.model
            )
        self._call("on_after_backward")
        return loss.detach(), outputs

    def _optimizer_step(self, collector: MetricCollector, step_loss: torch.Tensor) -> None:
        for optimizer in self.optimizers:
            self._call("on_before_optimizer_step", optimizer)
        logged: dict[str, tuple[torch.Tensor, bool]] = {"train_loss": (step_loss, True)}
        norm = None
        if self.gradient_clip_val is not None and self.gradient_clip_algorithm == "norm":
            norm = self.engine.clip_gradients(self.model, self.optimizers, max_norm=self.gradient_clip_val)
            logged["train_grad_norm"] = (norm.detach(), False)
        step_now = True
        if self.nonfinite.mode != "ignore":
            # The norm is not checked under loss scaling (an inf there is the GradScaler's business) or DeepSpeed (not known yet).
            check_norm = self.strategy.can_skip_optimizer_step and not self._loss_scaling()
            if check_norm and norm is None:
                norm = self.engine.clip_gradients(
                    self.model, self.optimizers, max_norm=math.inf
                )  # only the norm: scales by 1
            step_now = self.nonfinite.step_is_finite(
                self.engine, self.global_step + 1, step_loss, norm if check_norm else None
            )
        if self.gradient_clip_val is not None and self.gradient_clip_algorithm == "value":
            self.engine.clip_gradients(self.model, self.optimizers, clip_val=self.gradient_clip_val)
        if step_now:
            self.engine.step(*self.optimizers)
        for optimizer in self.optimizers:
            self._call("on_before_zero_grad", optimizer)
            optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if step_now:
            step_schedulers(self.lr_schedulers, "step", self.global_step, self.callback_metrics)
        collector.update(logged)
        if self.global_step % self.log_every_n_steps == 0 or self._reached_max_steps():
            collector.update({_STOP_REQUESTED: (self._stop_flag(), False)})  # agreement rides on the logging all-reduce
            self._log(collector, {"epoch": float(self.current_epoch)})
            collector.reset()
        elif (
            self.preemption is not None
            and self.preemption.check_every_n_steps
            and self.global_step % self.preemption.check_every_n_steps == 0
        ):
            self._stop_agreed = bool(self.engine.all_reduce(self._stop_flag(), "max").item())

    # ------------------------------------------------------------------ preemption
    def _stop_flag(self) -> torch.Tensor:
        return torch.tensor(1.0 if self._signals.requested else 0.0, device=self.engine.device)

    def _stop_for_preemption(self) -> None:
        """Every rank agreed to stop after this step: save (unless just saved), requeue, exit with code 75."""
        assert self.preemption is not None
        reason = (
            f"{self._signals.received} on rank {self.global_rank}"
            if self._signals.requested
            else "a stop signal received by another rank"
        )
        self.engine.wait_for_checkpoint()
        last = self._last_checkpoint
        path = last[1] if last is not None and last[0] == self.global_step else self.save_checkpoint()
        requeued = False
        if self.preemption.auto_requeue and self.is_global_zero and running_under_slurm_batch():
            requeued = requeue_slurm_job()
        preempted = Preempted(self.global_step, reason, path, requeued)
        if self.is_global_zero:
            print(f"[shardtrain] {preempted}; exiting with code {preempted.code}", flush=True)
        raise preempted

    def _loss_scaling(self) -> bool:
        return self.engine.precision.grad_scaler(self.engine.device.type) is not None

    def _reached_max_steps(self) -> bool:
        return 0 < self.max_steps <= self.global_step

    # ------------------------------------------------------------------ logging and hooks
    def _log(self, collector: MetricCollector, extra: dict[str, float]) -> dict[str, float]:
        metrics = collector.compute(lambda t: self.engine.all_reduce(t, "mean"), self.engine.device)
        if metrics.pop(_STOP_REQUESTED, 0.0) > 0:
            self._stop_agreed = True
        self.callback_metrics.update(metrics)
        self.progress_bar_metrics.update({name: metrics[name] for name in collector.prog_bar if name in metrics})
        if metrics and self.is_global_zero:
            row = {**metrics, **extra}
            for callback in self.callbacks:  # first: a callback may add figures to the row (ThroughputMonitor)
                callback.on_log(self, row, self.global_step)
            for logger in self.loggers:
                logger.log_metrics(row, self.global_step)
        return metrics

    def _rank_zero_loggers(self) -> list[Logger]:
        return self.loggers if self.is_global_zero else []

    def _call(self, hook: str, *args: Any) -> None:
        module_hook = getattr(self.module, hook, None)
        if callable(module_hook) and hook.startswith("on_"):
            module_hook(*args)
        for callback in self.callbacks:
            getattr(callback, hook)(self, self.module, *args)


_STOP_REQUESTED = "_shardtrain/stop_requested"


def _extract_loss(outputs: Any, module_name: str) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, torch.Tensor):
        raise TrainingStepError(
            f"{module_name}.training_step returned {type(outputs).__name__}; return the loss tensor or a dict with a 'loss' tensor"
        )
    if loss.numel() != 1:
        raise TrainingStepError(
            f"{module_name}.training_step returned a loss of shape {tuple(loss.shape)}; reduce it to one number (e.g. .mean())"
        )
    if not loss.requires_grad:
        raise TrainingStepError(
            f"{module_name}.training_step returned a loss that does not require grad; was it computed under torch.no_grad() or detached?"
        )
    return loss
