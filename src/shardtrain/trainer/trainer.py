"""The Trainer: the training loop, with accumulation, clipping, validation, logging and callbacks.

It knows nothing of strategies: every device, sharding and precision decision goes through the
:class:`~shardtrain.engine.Engine` it owns. ``batch_size`` of a DataLoader is per process, as in
Lightning: the global batch is ``batch_size * world_size * accumulate_grad_batches``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import DataLoader

from shardtrain.batch_transfer import batch_transfer
from shardtrain.callbacks import Callback, EarlyStopping, ModelCheckpoint
from shardtrain.checkpoint.pointer import resolve_checkpoint
from shardtrain.datamodule import DataModule
from shardtrain.engine.engine import Engine
from shardtrain.errors import ConfigError
from shardtrain.hparams import merged_for_loggers
from shardtrain.loggers import Logger
from shardtrain.logged import current_hook
from shardtrain.trainer.metrics import Entry, Results, reduce_entries
from shardtrain.module import TrainModule, extract_loss
from shardtrain.trainer.nonfinite import NonFiniteCheck
from shardtrain.optimization import SchedulerConfig, parse_optimizers, step_schedulers
from shardtrain.preemption import Preemption, StopAgreement
from shardtrain.seed import global_seed, seed_everything, seed_workers_requested, worker_init_function
from shardtrain.trainer.arguments import TrainerArguments, limited_batches
from shardtrain.trainer.loop_options import (
    can_stop_early,
    convert_sync_batchnorm,
    debug_limits,
    reload_due,
    sanity_batches,
    set_torch_flags,
)
from shardtrain.trainer.state import StageFlags, TrainerState
from shardtrain.trainer.checkpoint import TrainerCheckpoints
from shardtrain.trainer import loggers as trainer_loggers
from shardtrain.trainer.evaluation import PREDICT, TEST, VALIDATE, EvaluationLoop, Stage, loader_list, results_table
from shardtrain.trainer.hooks import (
    StepOptimizer,
    backward_function,
    check_backward_hook,
    check_module_hooks,
    overrides,
)
from shardtrain.trainer.manual_optimization import ManualOptimization, check_manual_optimization, is_manual
from shardtrain.trainer.validation import ValidationSchedule
from shardtrain.engine.wrapper import EngineModule

if TYPE_CHECKING:
    from shardtrain.strategies import Strategy


class Trainer:
    """Fit a :class:`TrainModule` on any strategy with one line of configuration.

    Takes the keyword arguments of :class:`~shardtrain.trainer.arguments.TrainerArguments` (all
    documented there), or one ``TrainerArguments`` object; every value is checked before
    anything starts. The arguments stay readable as attributes (``trainer.max_steps``).
    """

    def __init__(self, arguments: TrainerArguments | None = None, /, **options: Any) -> None:
        unknown = sorted(set(options) - set(TrainerArguments.names()))
        if unknown:
            raise ConfigError(
                f"Trainer got unknown arguments {unknown}; it takes: {', '.join(TrainerArguments.names())}"
            )
        args = TrainerArguments(**{**(vars(arguments) if arguments is not None else {}), **options})
        args = debug_limits(args)  # fast_dev_run and overfit_batches, as the limits Lightning makes of them
        self.args = args
        set_torch_flags(args.deterministic, args.benchmark)
        #: The run's config from ``shardtrain fit`` (its YAML, resolved), stored in checkpoints to resume from.
        self.run_config: dict[str, Any] | None = None
        self.engine = Engine(**args.engine_options())
        self.engine.configure_training(**args.training_settings())
        self.default_root_dir = Path(args.default_root_dir)
        self.max_epochs = args.epochs_limit
        self.preemption: Preemption | None = Preemption() if args.preemption is True else (args.preemption or None)
        self._stop = StopAgreement(self.preemption)
        self.nonfinite = NonFiniteCheck(args.on_nonfinite)
        self.callbacks: list[Callback] = args.callback_list()
        # fast_dev_run logs nothing, as Lightning (its DummyLogger); ModelCheckpoint saves nothing either
        self.loggers = [] if args.fast_dev_run else trainer_loggers.make_loggers(args.logger, self.default_root_dir)
        self.checkpoints = TrainerCheckpoints(self.engine, self.default_root_dir)
        self.validation = ValidationSchedule(args.val_check_interval, args.check_val_every_n_epoch)
        self.evaluation = EvaluationLoop(
            self._call,
            self._write,
            lambda stage: getattr(args, stage.limit),
            lambda: self.engine.device,
            lambda phase: self.engine.progress(self.global_step, phase),
            lambda: self.engine.combine_sequence_parts if self.engine.splits_evaluation else None,
        )
        #: The DataModule of the current (or last) stage, as in Lightning.
        self.datamodule: DataModule | None = None
        self._stage_datamodule: DataModule | None = None
        #: The checkpoint the last ``validate``/``test``/``predict`` loaded its weights from (``ckpt_path``).
        self.loaded_checkpoint: Path | None = None
        self.state = TrainerState()
        self.is_last_batch = False
        self.num_training_batches: int | float = 0
        self.num_val_batches: list[int | float] = []
        self._train_loader_from_module = False
        self._val_loader_from_module = False
        self._loaders_loaded_at_epoch = 0
        self.global_step = 0
        #: The step the loggers write rows at (Lightning's ``fit_loop.epoch_loop._batches_that_stepped``): the training
        #: batches that ended in an optimizer step (every batch under manual optimization), over the whole run. A
        #: batch's rows (its training metrics, a validation run inside it) are written at the count before it.
        self.batches_that_stepped = 0
        self._stepped_in_batch = False
        self.current_epoch = 0
        self.batches_seen_in_epoch = 0
        self.callback_metrics: dict[str, float] = {}
        #: What was last sent to the loggers, per name (Lightning's ``logged_metrics``).
        self.logged_metrics: dict[str, float] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.should_stop = False
        self.estimated_stepping_batches: int | float = math.inf
        self.module: TrainModule | None = None
        self.model: EngineModule | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_schedulers: list[SchedulerConfig] = []
        self.train_loader: Any = None
        #: The stage running or last run: "fit", "validate", "test" or "predict".
        self.stage: str | None = None
        #: Batches of each validation loader of the current fit (Lightning's ``num_val_batches``; empty: no validation).
        self.num_val_batches: list[int | float] = []
        #: Whether gradients of a step still being accumulated are held (validation then keeps them).
        self._accumulating = False
        #: Set up by fit for a module with ``automatic_optimization = False`` (see ``manual_optimization``).
        self.manual_optimization: ManualOptimization | None = None

    def __getattr__(self, name: str) -> Any:
        """The arguments as attributes: ``trainer.max_steps``, ``trainer.accumulate_grad_batches``, ..."""
        args = self.__dict__.get("args")
        if args is not None and name in TrainerArguments.names():
            return getattr(args, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ public API
    @property
    def strategy(self) -> Strategy:
        return self.engine.strategy

    global_rank = property(lambda self: self.engine.global_rank)
    world_size = property(lambda self: self.engine.world_size)

    is_global_zero = property(lambda self: self.engine.is_global_zero)
    lightning_module = property(lambda self: self.module, doc="The user's module (Lightning's name).")
    training = StageFlags("train")
    validating = StageFlags("validate")
    sanity_checking = StageFlags("sanity_check")
    testing = StageFlags("test")
    predicting = StageFlags("predict")

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        """Every ``ModelCheckpoint`` among the callbacks (Lightning's)."""
        return [c for c in self.callbacks if isinstance(c, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        """The first ``ModelCheckpoint`` (Lightning's): ``trainer.checkpoint_callback.best_model_path``."""
        return next(iter(self.checkpoint_callbacks), None)

    @property
    def early_stopping_callbacks(self) -> list[EarlyStopping]:
        return [c for c in self.callbacks if isinstance(c, EarlyStopping)]

    @property
    def early_stopping_callback(self) -> EarlyStopping | None:
        """The first ``EarlyStopping`` (Lightning's)."""
        return next(iter(self.early_stopping_callbacks), None)

    @property
    def logger(self) -> Logger | None:
        """The first logger, or None (Lightning's ``trainer.logger``); setting it replaces them all."""
        return self._loggers[0] if self._loggers else None

    @logger.setter
    def logger(self, logger: Logger | None) -> None:
        self.loggers = [logger] if logger else []

    @property
    def loggers(self) -> list[Logger]:
        """Every logger, in the order given (``logger=True``: the default CSV logger; none: ``[]``)."""
        return self._loggers

    @loggers.setter
    def loggers(self, loggers: list[Logger] | None) -> None:
        self._loggers = list(loggers) if loggers else []

    @property
    def log_dir(self) -> str:
        """Where this run's logs go: the first logger's ``log_dir`` (CSV, TensorBoard) or ``save_dir``, else
        ``default_root_dir`` (Lightning's rule); call it on every rank (rank 0's answer is broadcast)."""
        return trainer_loggers.log_dir(self._loggers, self.default_root_dir, self._broadcast_when_launched)

    def _broadcast_when_launched(self, obj: Any) -> Any:
        launched = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self.engine.broadcast(obj) if launched else obj

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoints.directory

    def init_module(self) -> Any:
        """Context for building a model outside ``configure_model`` where the strategy wants it."""
        self.engine.launch()
        return self.engine.init_module()

    def fit(
        self,
        model: TrainModule,
        train_dataloaders: DataLoader | DataModule | None = None,
        val_dataloaders: DataLoader | Sequence[DataLoader] | None = None,
        datamodule: DataModule | None = None,
        ckpt_path: str | os.PathLike | None = None,
    ) -> None:
        """Train ``model`` on ``train_dataloaders`` (or a DataModule's, or the model's own ``train_dataloader()``),
        validating on ``val_dataloaders`` (one loader or several); resume from ``ckpt_path`` (a checkpoint,
        consolidated weights, or ``"last"``). As in Lightning, ``fit(model, datamodule)`` works too.
        Raises :class:`~shardtrain.preemption.Preempted` (exit code 75) on every rank after saving a
        checkpoint when a preemption signal arrived (see ``preemption``)."""
        if isinstance(train_dataloaders, DataModule):
            if datamodule is not None:
                raise ConfigError("Trainer.fit got two DataModules (train_dataloaders and datamodule): pass one")
            datamodule, train_dataloaders = train_dataloaders, None
        _refuse_loaders_with_datamodule("fit", datamodule, train_dataloaders, val_dataloaders)
        module = model
        self._stop.install()
        status = "failed"
        try:
            self._begin(module, datamodule, "fit")
        except BaseException:
            self._stop.uninstall()
            raise
        try:
            self._prepare_stage(
                module, "fit"
            )  # as in Lightning: before the loaders are asked for and the model is built
            self.engine.choose_strategy(module)  # strategy="auto": first, as the layout decides each rank's data
            self._check_backward_hook(module)  # the strategy chosen may run backward itself
            self.state.fn = "fit"
            self._train_loader_from_module = train_dataloaders is None
            self._val_loader_from_module = val_dataloaders is None
            train_loader = self._loader(train_dataloaders, module, "train_dataloader", required=True, training=True)
            self.train_loader = train_loader  # a StatefulDataLoader's position goes into checkpoints
            val_loaders = self._loaders(val_dataloaders, module, VALIDATE, required=False)
            self._count_batches(train_loader, val_loaders)
            self.estimated_stepping_batches = self.args.stepping_batches(train_loader)
            self.engine.configure_training(
                **self.args.training_settings(),
                micro_batch_size=getattr(train_loader, "batch_size", None),
                manual_optimization=is_manual(module),
            )
            self._setup(module, "fit")
            self._log_hyperparams(module)
            self.nonfinite.refuse_what_cannot_be_done(self.engine.can_skip_optimizer_step, self._loss_scaling())
            if ckpt_path is not None:
                self._restore(ckpt_path)
            self._call("on_fit_start")
            self._sanity_check(val_loaders, resumed=ckpt_path is not None)
            self._train(train_loader, val_loaders)
            self._call("on_fit_end")
            self.engine.progress(None, "done")  # out of the loop: what the script does next is not judged a hang
            status = "success"
        except BaseException as exception:
            status = "failed"
            self._on_exception(exception)
            peer_failure = self.engine.explain_failure(exception)
            if peer_failure is not None:
                raise peer_failure from exception
            raise
        finally:
            self.state.fn = self.state.stage = None
            self._stop.uninstall()
            self.engine.wait_for_checkpoint()
            trainer_loggers.finalize(self._rank_zero_loggers(), status)
            self._teardown(module, "fit")

    def validate(
        self,
        model: TrainModule | None = None,
        dataloaders: DataLoader | Sequence[DataLoader] | DataModule | None = None,
        ckpt_path: str | os.PathLike | None = None,
        verbose: bool = True,
        datamodule: DataModule | None = None,
    ) -> list[dict[str, float]]:
        """Run the validation loop once; returns, per loader, the metrics averaged over its batches and reduced over
        ranks (Lightning's list of dicts). ``ckpt_path``: ``"best"``, ``"last"`` or a path, loaded first (weights
        only); None: the model as it is (after ``fit``: as trained)."""
        return self._evaluate(VALIDATE, model, dataloaders, ckpt_path, datamodule, verbose=verbose)

    def test(
        self,
        model: TrainModule | None = None,
        dataloaders: DataLoader | Sequence[DataLoader] | DataModule | None = None,
        ckpt_path: str | os.PathLike | None = None,
        verbose: bool = True,
        datamodule: DataModule | None = None,
    ) -> list[dict[str, float]]:
        """Run ``test_step`` over the test loaders once (``test_dataloader()`` of the DataModule or the model when none
        is given); returns the metrics per loader, as ``validate`` does."""
        return self._evaluate(TEST, model, dataloaders, ckpt_path, datamodule, verbose=verbose)

    def predict(
        self,
        model: TrainModule | None = None,
        dataloaders: DataLoader | Sequence[DataLoader] | DataModule | None = None,
        datamodule: DataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | os.PathLike | None = None,
    ) -> list[Any] | None:
        """Run ``predict_step`` over the predict loaders; returns this rank's outputs (a list per loader when there
        are several), as Lightning's ``predict`` gives each rank its own share of the data; None with
        ``return_predictions=False``."""
        keep = True if return_predictions is None else bool(return_predictions)
        results = self._evaluate(PREDICT, model, dataloaders, ckpt_path, datamodule, return_predictions=keep)
        return results if keep else None

    def _evaluate(
        self,
        stage: Stage,
        model: TrainModule | None,
        dataloaders: Any,
        ckpt_path: str | os.PathLike | None,
        datamodule: DataModule | None,
        verbose: bool = False,
        return_predictions: bool = True,
    ) -> list[Any]:
        if isinstance(dataloaders, DataModule):
            if datamodule is not None:
                raise ConfigError(f"Trainer.{stage.name} got two DataModules (dataloaders and datamodule): pass one")
            datamodule, dataloaders = dataloaders, None
        _refuse_loaders_with_datamodule(stage.name, datamodule, dataloaders)
        if model is None:
            if self.module is None:
                raise ConfigError(
                    f"Trainer.{stage.name}() was given no model and has not fitted one: pass the model, "
                    f"trainer.{stage.name}(model, ...)"
                )
            model = self.module
            if ckpt_path is None and self._best_checkpoint() is not None:
                ckpt_path = "best"  # Lightning: without a model, the best checkpoint of the previous fit
        self._begin(model, datamodule, stage.name)
        try:
            self._prepare_stage(model, stage.name)
            self._setup(model, stage.name)
            self._log_hyperparams(model)
            if ckpt_path is not None:
                self._load_weights(ckpt_path)
            loaders = self._loaders(dataloaders, model, stage, required=True)
            self.state.fn = self.state.stage = stage.name
            if stage is VALIDATE:
                self._count_batches(None, loaders)
            results = self.evaluation.run(
                stage,
                self.model,
                model,
                loaders,
                inference_mode=self.args.inference_mode and self.engine.supports_inference_mode,
                return_predictions=return_predictions,
                extra={"epoch": float(self.current_epoch)},
            )
            if verbose and self.is_global_zero and stage.logs:
                print(results_table(stage, results), flush=True)
            trainer_loggers.finalize(self._rank_zero_loggers(), "success")
            self.engine.progress(None, "done")
            return results
        except BaseException as exception:
            self._on_exception(exception)
            trainer_loggers.finalize(self._rank_zero_loggers(), "failed")
            raise
        finally:
            self.state.fn = self.state.stage = None
            self._teardown(model, stage.name)

    def _teardown(self, module: TrainModule, stage: str) -> None:
        """As Lightning: the DataModule's ``teardown(stage)``, every callback's, then the module's; then the engine's.
        The set-up model stays readable (``save_checkpoint()`` after ``fit`` works)."""
        try:
            if self.datamodule is not None:
                self.datamodule.teardown(stage)
            for callback in self.callbacks:
                callback.teardown(self, module, stage)
            if callable(getattr(module, "teardown", None)):
                module.teardown(stage)
        finally:
            self.engine.teardown()

    def _on_exception(self, exception: BaseException) -> None:
        """Lightning's ``on_exception``: the callbacks', then the DataModule's."""
        self._call("on_exception", exception)
        if self.datamodule is not None:
            self.datamodule.on_exception(exception)

    # ------------------------------------------------------------------ set-up
    def _begin(self, module: TrainModule, datamodule: DataModule | None, stage: str) -> None:
        """Checks before any process group (a hook that would be ignored, a layout the model cannot take), then the
        processes start and the module and DataModule are attached."""
        if not isinstance(module, TrainModule):
            raise ConfigError(f"Trainer.{stage} takes a shardtrain.TrainModule, got {type(module).__name__}")
        if datamodule is not None and not isinstance(datamodule, DataModule):
            raise ConfigError(f"datamodule must be a shardtrain.DataModule, got {type(datamodule).__name__}")
        module._trainer = self
        self.stage = stage
        check_module_hooks(module, TrainModule)  # a Lightning hook we do not call: refused, never ignored
        self._check_backward_hook(module)
        if stage == "fit":
            check_manual_optimization(module, self.args, TrainModule)
        self.engine.check_module(module)  # before any process group: e.g. heads that TP cannot split
        self.engine.launch()
        self.engine.report_hangs_to(self.default_root_dir)
        self._stage_datamodule = datamodule  # its batch-transfer hooks run (not a DataModule kept from a stage before)
        if datamodule is not None:  # as Lightning: a stage given none keeps the DataModule of the one before
            self.datamodule = datamodule
            datamodule.trainer = self

    def _check_backward_hook(self, module: TrainModule) -> None:
        strategy = self.engine.strategy
        check_backward_hook(module, TrainModule, self.engine.supports_custom_backward, strategy.name)

    def _prepare_stage(self, module: TrainModule, stage: str) -> None:
        """As Lightning at the start of every stage: ``configure_callbacks``, ``prepare_data``, then ``setup(stage)``;
        the metrics of the stage before are cleared, and evaluation rows count batches from 0 again."""
        self._attach_module_callbacks(module)
        self._prepare_data(module)
        self._setup_hooks(module, stage)
        self.callback_metrics.clear()
        self.logged_metrics.clear()
        self.progress_bar_metrics.clear()
        self.evaluation.restart_batch_counts()

    def _attach_module_callbacks(self, module: TrainModule) -> None:
        """Lightning's ``configure_callbacks()``: its callbacks replace the Trainer's of the same types and join the
        others; checkpoint callbacks go last, so that they save what the other callbacks did."""
        if not overrides(module, "configure_callbacks", TrainModule):
            return
        extra = module.configure_callbacks()
        extra = [extra] if isinstance(extra, Callback) else list(extra or [])
        replaced = {type(callback) for callback in extra}
        callbacks = [c for c in self.callbacks if type(c) not in replaced] + extra
        self.callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)] + [
            c for c in callbacks if isinstance(c, ModelCheckpoint)
        ]

    def _prepare_data(self, module: TrainModule) -> None:
        """Lightning's ``prepare_data()``, the DataModule's then the module's: once per node (local rank 0;
        ``prepare_data_per_node = False``: global rank 0 only), before ``setup``; every rank waits for it."""
        for owner, base in ((self.datamodule, DataModule), (module, TrainModule)):
            if owner is None or not overrides(owner, "prepare_data", base):
                continue
            per_node = getattr(owner, "prepare_data_per_node", True)
            if (self.engine.local_rank if per_node else self.global_rank) == 0:
                owner.prepare_data()
            self.engine.barrier()

    def _setup_hooks(self, module: TrainModule, stage: str) -> None:
        """Every stage, as Lightning: the DataModule's ``setup(stage)``, each callback's ``setup(trainer, module,
        stage)``, then the module's ``setup(stage)``."""
        # as Lightning: first, so that a run's id is known in setup
        trainer_loggers.start_experiments(self.loggers, self._broadcast_when_launched)
        if self.datamodule is not None:
            self.datamodule.setup(stage)
        for callback in self.callbacks:
            callback.setup(self, module, stage)
        if callable(getattr(module, "setup", None)):
            module.setup(stage)

    def _setup(self, module: TrainModule, stage: str) -> None:
        """Set the model up once: a later stage on the same module reuses it (an evaluation under a strategy whose
        teardown stopped it from running, DeepSpeed, sets the trained module up again for evaluation)."""
        if not (self.module is module and self.model is not None):
            self._set_up_model(module, stage)
        elif stage != "fit" and not self.engine.runs_modules_after_teardown:
            self.model = self.engine.setup_module(module)

    def _set_up_model(self, module: TrainModule, stage: str) -> None:
        self.engine.choose_strategy(module)  # strategy="auto" (validate): from the model, before it is built
        if self.args.seed is not None:
            seed_everything(self.args.seed, workers=seed_workers_requested(), verbose=False)
        with self.engine.init_module():
            module.configure_model()
        if self.args.sync_batchnorm:
            convert_sync_batchnorm(module, self.engine.strategy.name, self.engine.device.type, self.world_size)
        self.module = module
        if stage == "fit":

            def configure_optimizers() -> list[torch.optim.Optimizer]:
                self.model = module  # readable there, as in Lightning (the strategy's module: parameters in place)
                optimizers, self.lr_schedulers = parse_optimizers(module.configure_optimizers())
                return optimizers

            try:
                self.model, self.optimizers = self.engine.setup_module_and_optimizers(module, configure_optimizers)
            except BaseException:
                self.model = None
                raise
            self.manual_optimization = ManualOptimization(self) if is_manual(module) else None
        else:
            self.model = self.engine.setup_module(module)

    def _loader(self, given: Any, module: TrainModule, hook: str, required: bool, training: bool = False) -> Any:
        """The loader ``given``, else the DataModule's ``hook()``, else the module's (Lightning's order), set up."""
        loaders = self._requested_loaders(given, module, hook)
        if not loaders:
            if required:
                raise ConfigError(self._no_loader_message(module, hook))
            return None
        if len(loaders) > 1:
            raise ConfigError(f"{hook} returned {len(loaders)} loaders; training takes one")
        return self._set_up_loader(loaders[0], module, training=training)

    def _set_up_loader(
        self,
        loader: Any,
        module: TrainModule,
        training: bool = False,
        pad_to_equal: bool = True,
        dataloader_idx: int = 0,
    ) -> Any:
        """One loader set up for this run: Lightning's seeded workers, and its DistributedSampler, which shuffles
        the training data under several processes even when the loader was made with shuffle=False (not under
        ``overfit_batches``); seeded by ``seed`` or ``seed_everything``'s ``PL_GLOBAL_SEED``."""
        if seed_workers_requested() and getattr(loader, "num_workers", 0) > 0 and loader.worker_init_fn is None:
            loader.worker_init_fn = functools.partial(worker_init_function, rank=self.global_rank)  # as Lightning
        overfit = self.args.overfit_batches > 0
        shuffle = False if overfit else (True if training and self.engine.data_parallel_size > 1 else None)
        return self.engine.setup_dataloaders(
            loader,
            use_distributed_sampler=self.args.use_distributed_sampler,
            seed=self.args.seed if self.args.seed is not None else global_seed(),
            shuffle=shuffle,
            pad_to_equal=pad_to_equal,
            transfer=batch_transfer(module, self._stage_datamodule, self.engine.device, dataloader_idx),
        )

    def _loaders(self, given: Any, module: TrainModule, stage: Stage, required: bool) -> list[Any]:
        """The loaders of an evaluation stage (one or several), set up: each rank reads its own share in order
        (predict: without the samples a DistributedSampler repeats to even the shares, as in Lightning)."""
        loaders = self._requested_loaders(given, module, stage.dataloader)
        if not loaders and required:
            raise ConfigError(self._no_loader_message(module, stage.dataloader))
        return [
            self._set_up_loader(loader, module, pad_to_equal=stage.name != "predict", dataloader_idx=index)
            for index, loader in enumerate(loaders)
        ]

    def _requested_loaders(self, given: Any, module: TrainModule, hook: str) -> list[Any]:
        if given is None and self.datamodule is not None:
            given = getattr(self.datamodule, hook)()
        if given is None and callable(getattr(module, hook, None)):
            given = getattr(module, hook)()
        return loader_list(given)

    def _no_loader_message(self, module: TrainModule, hook: str) -> str:
        where = f"define {type(module).__name__}.{hook}()"
        if self.datamodule is not None:
            where = f"define {type(self.datamodule).__name__}.{hook}() or " + where
        return f"no {hook.replace('_', ' ')}: pass it to the Trainer, {where}"

    def _best_checkpoint(self) -> str | None:
        """The best checkpoint of the first ``ModelCheckpoint`` (Lightning's ``trainer.checkpoint_callback``)."""
        callback = self.checkpoint_callback
        return str(callback.best_model_path) if callback is not None and callback.best_model_path else None

    def _load_weights(self, ckpt_path: str | os.PathLike) -> None:
        """Load only the model's weights for evaluation: ``"best"``, ``"last"`` or a path (checkpoint or weights)."""
        if str(ckpt_path) == "best":
            best = self._best_checkpoint()
            if best is None:
                raise ConfigError(
                    'ckpt_path="best", but there is no best checkpoint: no ModelCheckpoint of this Trainer has saved '
                    'one (trainer.checkpoint_callback.best_model_path is empty); fit first, pass a path, or "last"'
                )
            ckpt_path = best
        path = resolve_checkpoint(ckpt_path, self.checkpoints.directory)
        if path is None:
            # Lightning: not an error, so that "last" can be set before the first fit; the weights in memory are used.
            if self.is_global_zero:
                warnings.warn(
                    f'ckpt_path="last", but no checkpoint was saved in {self.checkpoints.directory} yet: no checkpoint '
                    "is loaded, the model's current weights are evaluated (save one, or pass a path)",
                    stacklevel=4,
                )
            self.loaded_checkpoint = None
            return
        self.checkpoints.load_weights(path, self)
        self.loaded_checkpoint = path

    def _count_batches(self, train_loader: Any, val_loaders: list[Any]) -> None:
        """``trainer.num_training_batches`` and ``num_val_batches`` (per epoch, after the ``limit_*`` arguments)."""
        if train_loader is not None:
            self.num_training_batches = _batches(train_loader, self.args.limit_train_batches)
        self.num_val_batches = [_batches(loader, self.args.limit_val_batches) for loader in val_loaders]

    def _sanity_check(self, val_loaders: list[Any], resumed: bool) -> None:
        """Lightning's sanity check: a few validation batches before training, nothing logged or kept.

        In a resumed run it leaves the random-number state as the checkpoint restored it (iterating a loader
        draws from it), so that the run continues as the uninterrupted one did."""
        batches = sanity_batches(self.args)
        if not val_loaders or batches <= 0 or not any(self.num_val_batches):
            return
        self.state.stage = "sanity_check"
        cuda = [self.engine.device] if self.engine.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda) if resumed else contextlib.nullcontext():
            for callback in self.callbacks:
                callback.on_sanity_check_start(self, self.module)
            self.evaluation.run(VALIDATE, self.model, self.module, val_loaders, max_batches=batches, keep_metrics=False)
            for callback in self.callbacks:
                callback.on_sanity_check_end(self, self.module)
        self.state.stage = None

    def _reload_loaders(self, val_loaders: list[Any]) -> tuple[Any, list[Any]]:
        """``reload_dataloaders_every_n_epochs``: the loaders asked for again from the DataModule or the module
        (loaders given to ``fit`` stay)."""
        self._loaders_loaded_at_epoch = self.current_epoch
        train_loader = self.train_loader
        if self._train_loader_from_module:
            train_loader = self._loader(None, self.module, "train_dataloader", required=True, training=True)
            self.train_loader = train_loader
        if val_loaders and self._val_loader_from_module:
            val_loaders = self._loaders(None, self.module, VALIDATE, required=False)
            self.evaluation.restart_batch_counts()  # as Lightning: the counts depend on the loaders
        self._count_batches(train_loader, val_loaders)
        return train_loader, val_loaders

    def _can_stop_early(self) -> bool:
        return can_stop_early(self.args, self.current_epoch, self.global_step)

    def _fit_done(self) -> bool:
        """``max_steps``/``max_epochs`` reached, or a stop request once ``min_epochs``/``min_steps`` are met."""
        if self._reached_max_steps() or (self.max_epochs is not None and self.current_epoch >= self.max_epochs):
            return True
        return self.should_stop and self._can_stop_early()

    # ------------------------------------------------------------------ training
    def _train(self, train_loader: Any, val_loaders: list[Any]) -> None:
        assert self.model is not None
        self.should_stop = self._reached_max_steps() or (
            self.max_epochs is not None and self.current_epoch >= self.max_epochs
        )
        self.state.stage = "train"
        self._loaders_loaded_at_epoch = self.current_epoch
        self._results = Results()
        self._call("on_train_start")
        while not self._fit_done():
            if reload_due(self.args, self.current_epoch, self._loaders_loaded_at_epoch):
                train_loader, val_loaders = self._reload_loaders(val_loaders)
            self.model.train()
            train_loader.set_epoch(self.current_epoch)
            self._call("on_train_epoch_start")
            self._results.add(self.module.pop_logged())
            finished = self._train_epoch(train_loader, val_loaders)
            # Lightning ends the epoch (on_train_epoch_end, epoch metrics) also when max_steps or a stop request ends
            # it early; the position in the epoch stays then (not current_epoch + 1): a run resumed from here continues it.
            self._end_training_epoch()
            if not finished:
                break
            self.current_epoch += 1
            self.batches_seen_in_epoch = 0
            if self.manual_optimization is None:  # manual optimization: the module steps its schedulers
                step_schedulers(
                    self.lr_schedulers, "epoch", self.current_epoch, self.callback_metrics, self._scheduler_step()
                )
            if self.max_epochs is not None and self.current_epoch >= self.max_epochs:
                self.should_stop = True
        self._stepped_in_batch = False
        self._call("on_train_end")

    def _train_epoch(self, train_loader: Any, val_loaders: list[Any]) -> bool:
        """Train until the epoch's data runs out (or ``on_train_batch_start`` returns -1: returns True) or
        training must stop (False)."""
        num_batches = self.num_training_batches
        interval = self.validation.interval(num_batches)
        accumulate = self.args.accumulate_grad_batches
        step_loss = torch.zeros((), device=self.engine.device)
        start = self.batches_seen_in_epoch  # resuming mid-epoch: these batches were already trained on
        train_loader.start_at(start)  # skipped by index, not loaded (see DeviceDataLoader)
        validated, skipped_rest = False, False
        progress = self.engine.progress  # where this rank is, for hang reports: two assignments, no sync
        free_gradients = self._frees_gradients_after_steps()
        progress(self.global_step, "data")
        # islice: no batch past the limit is read (nor moved, nor given to the batch-transfer hooks)
        batches = (
            train_loader
            if math.isinf(num_batches)
            else itertools.islice(train_loader, max(int(num_batches) - start, 0))
        )
        for batch_idx, batch in enumerate(batches, start=start):
            progress(self.global_step, "training_step")
            validated, self._stepped_in_batch = False, False
            is_last = batch_idx + 1 == num_batches
            self.is_last_batch = is_last
            if self._call("on_train_batch_start", batch, batch_idx) == -1:  # Lightning: skip the rest of the epoch
                skipped_rest = True
                break
            step_now = (batch_idx + 1) % accumulate == 0 or is_last
            if self.manual_optimization is not None:  # the module steps (and counts global_step) itself
                with current_hook(self.module, "training_step"):
                    outputs = self.manual_optimization.training_step(batch, batch_idx)
                self._results.add(self.module.pop_logged(), batch)
                self.batches_seen_in_epoch = batch_idx + 1
                self._count_stepped_batch()
                self._log_if_due(self.batches_that_stepped)
                step_now = False
            else:
                loss, outputs = self._training_micro_step(
                    batch, batch_idx, sync=step_now, first=batch_idx % accumulate == 0
                )
                step_loss += loss
                self._results.add(self.module.pop_logged(), batch)
                self.batches_seen_in_epoch = batch_idx + 1
            self._accumulating = not step_now and self.manual_optimization is None
            if step_now:
                micro_batches = (batch_idx % accumulate) + 1
                progress(self.global_step, "optimizer_step")
                self._optimizer_step(step_loss / micro_batches, batch_idx)
                step_loss = torch.zeros((), device=self.engine.device)
            self._call("on_train_batch_end", outputs, batch, batch_idx)
            self._results.add(self.module.pop_logged(), batch)
            if step_now and free_gradients:
                self._free_gradients()
            stop_requested = self.should_stop and self._can_stop_early()
            if (
                val_loaders
                and self.validation.epoch_due(self.current_epoch)
                and ((interval and (batch_idx + 1) % interval == 0) or (not interval and is_last) or stop_requested)
            ):  # Lightning validates when a stop request will end the epoch, too
                self._validate_in_fit(val_loaders)
                validated = True
            progress(self.global_step, "data")  # the next batch is read next
            if self._stop.agreed and not self._reached_max_steps():  # on the last step, just finish
                self._stop.stop(self.global_step, self.global_rank, self._checkpoint_for_stop)
            if self._reached_max_steps() or (self.should_stop and self._can_stop_early()):
                self.should_stop = True
                if self.batches_seen_in_epoch < num_batches:
                    return False
                break
        end_of_epoch_validation = not interval and not validated and not skipped_rest
        if val_loaders and end_of_epoch_validation and self.validation.epoch_due(self.current_epoch):
            self._validate_in_fit(val_loaders)  # a loader without a length: its end is known only now
        return True

    def _training_micro_step(self, batch: Any, batch_idx: int, sync: bool, first: bool) -> tuple[torch.Tensor, Any]:
        """Forward and backward of one micro-batch; the first of a step zeroes the gradients between the
        ``training_step`` and the backward (Lightning's order: ``on_before_zero_grad``, ``optimizer_zero_grad``);
        where the strategy's schedule runs the batch itself (pipeline parallelism), before the schedule."""
        zero_before = first and self.engine.runs_batches_itself
        if zero_before:
            self._zero_grad(batch_idx)

        def compute_loss() -> tuple[torch.Tensor, Any]:
            with current_hook(self.module, "training_step"):
                outputs = self.model.training_step(*self.module._step_arguments("training_step", batch, batch_idx))
            loss = extract_loss(outputs, type(self.module).__name__)
            if first and not zero_before:
                self._zero_grad(batch_idx)
            self._call("on_before_backward", loss)
            return loss, outputs

        run_backward = backward_function(self.module, TrainModule)
        loss, outputs = self.engine.forward_backward(
            self.model, compute_loss, synchronize=sync, batch=batch, run_backward=run_backward
        )
        self._call("on_after_backward")
        return loss, outputs

    def _optimizer_step(self, step_loss: torch.Tensor, batch_idx: int) -> None:
        logged: dict[str, tuple[torch.Tensor, bool]] = {"train_loss": (step_loss, True)}
        stepped: list[bool] = []
        if overrides(self.module, "optimizer_step", TrainModule):  # Lightning's signature and order

            def closure() -> torch.Tensor:
                return step_loss  # forward and backward have run (in forward_backward): nothing to recompute

            for optimizer in self.optimizers:
                take_step = functools.partial(self._clip_and_step, [optimizer], step_loss, logged, stepped)
                with current_hook(self.module, "optimizer_step"):
                    self.module.optimizer_step(
                        self.current_epoch, batch_idx, StepOptimizer(optimizer, take_step), closure
                    )
        else:
            self._clip_and_step(self.optimizers, step_loss, logged, stepped)
        step_now = bool(stepped) and all(stepped)
        self.global_step += 1
        self._count_stepped_batch()
        if step_now:
            step_schedulers(self.lr_schedulers, "step", self.global_step, self.callback_metrics, self._scheduler_step())
        self._results.add(self.module.pop_logged())
        self._log_if_due(self.batches_that_stepped, logged)

    def _count_stepped_batch(self) -> None:
        self.batches_that_stepped += 1
        self._stepped_in_batch = True

    def _logger_step(self) -> int:
        """The step of rows written now: inside a training batch that stepped, the count before it."""
        return self.batches_that_stepped - 1 if self._stepped_in_batch else self.batches_that_stepped

    def _log_if_due(self, batches: int, own: dict[str, tuple[torch.Tensor, bool]] | None = None) -> None:
        """Write the step's metrics every ``log_every_n_steps`` batches that stepped (``batches``: this one
        included; Lightning's cadence); ``own``: shardtrain's figures (the step's loss and gradient norm), averaged
        over ranks. The stop agreement rides on the same collectives."""
        if not (batches % self.args.log_every_n_steps == 0 or self._reached_max_steps()):
            if self._stop.check_due(self.global_step):
                self._stop.agreed = bool(self.engine.all_reduce(self._stop.flag(self.engine.device), "max").item())
            return
        entries = self._results.take_step_entries(self.engine.device)
        entries += [  # on the run's device: under CPU offload the gradient norm is on the CPU, the loss is not
            Entry(
                name,
                value.detach().float().reshape(1).to(self.engine.device),
                "mean",
                True,
                _first_value,
                prog_bar=prog_bar,
            )
            for name, (value, prog_bar) in (own or {}).items()
        ]
        flag = self._stop.flag(self.engine.device).float().reshape(1)
        entries.append(Entry(_STOP_REQUESTED, flag, "max", True, _first_value, logger=False))
        self._write(entries, {"epoch": float(self.current_epoch)})

    def _frees_gradients_after_steps(self) -> bool:
        """Whether gradients are freed when a batch that stepped ends (after ``on_train_batch_end``). Lightning zeroes
        them only just before the next backward (after the next ``training_step``), so its next forward runs beside
        the last step's gradients: one more copy of the trainable weights, sharded as they are (measured: the whole
        gap between shardtrain's peak memory and a hand-written loop's, which frees them after its step). Freed
        early only where nothing sees the difference: automatic optimization, and no module or callback overriding
        ``on_before_zero_grad`` or ``optimizer_zero_grad`` (those keep Lightning's timing)."""
        if self.manual_optimization is not None:
            return False
        if any(overrides(self.module, hook, TrainModule) for hook in ("on_before_zero_grad", "optimizer_zero_grad")):
            return False
        return not any(overrides(callback, "on_before_zero_grad", Callback) for callback in self.callbacks)

    def _free_gradients(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def _zero_grad(self, batch_idx: int) -> None:
        own_zero_grad = overrides(self.module, "optimizer_zero_grad", TrainModule)
        for optimizer in self.optimizers:
            self._call("on_before_zero_grad", optimizer)
            if own_zero_grad:
                self.module.optimizer_zero_grad(self.current_epoch, batch_idx, optimizer)
            else:
                optimizer.zero_grad(set_to_none=True)

    def _clip_and_step(
        self,
        optimizers: list[torch.optim.Optimizer],
        step_loss: torch.Tensor,
        logged: dict[str, tuple[torch.Tensor, bool]],
        stepped: list[bool],
    ) -> None:
        """``on_before_optimizer_step``, clipping (the Trainer's, or the module's ``configure_gradient_clipping``),
        the non-finite check, and the strategy's step; appends to ``stepped`` whether the step was taken."""
        for optimizer in optimizers:
            self._call("on_before_optimizer_step", optimizer)
        own_clipping = overrides(self.module, "configure_gradient_clipping", TrainModule)
        clip_val, clip_by = self.args.gradient_clip_val, self.args.gradient_clip_algorithm
        norm = None
        if clip_val is not None and clip_by == "norm" and not own_clipping:
            norm = self.engine.clip_gradients(self.model, optimizers, max_norm=clip_val)
            logged["train_grad_norm"] = (norm.detach(), False)
        step_now = True
        if self.nonfinite.mode != "ignore":
            # The norm is not checked under loss scaling (an inf there is the GradScaler's business) or DeepSpeed (not known yet).
            check_norm = self.engine.can_skip_optimizer_step and not self._loss_scaling()
            if check_norm and norm is None:
                norm = self.engine.gradient_norm(optimizers)
            step_now = self.nonfinite.step_is_finite(
                self.engine, self.global_step + 1, step_loss, norm if check_norm else None
            )
        if own_clipping:
            for optimizer in optimizers:
                self.module.configure_gradient_clipping(optimizer, clip_val, clip_by if clip_val is not None else None)
        elif clip_val is not None and clip_by == "value":
            self.engine.clip_gradients(self.model, optimizers, clip_val=clip_val)
        if step_now:
            self.engine.step(*optimizers)
        stepped.append(step_now)

    def _validate_in_fit(self, val_loaders: list[Any]) -> None:
        """Validation inside ``fit``: gradients freed first (Lightning's ``on_validation_model_zero_grad``), and
        ``torch.no_grad`` rather than inference mode (tensors a model caches while validating may be trained on)."""
        if not self._accumulating:  # Lightning: between steps, the gradients are freed (or the override runs)
            self.module.on_validation_model_zero_grad()
        self.state.stage = "validate"  # trainer.validating
        try:
            extra = {"epoch": float(self.current_epoch)}
            self.evaluation.run(VALIDATE, self.model, self.module, val_loaders, extra=extra)
        finally:
            self.state.stage = "train"

    def _scheduler_step(self) -> Any:
        """The module's ``lr_scheduler_step`` where it overrides it, else None (``scheduler.step()``)."""
        return self.module.lr_scheduler_step if overrides(self.module, "lr_scheduler_step", TrainModule) else None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self,
        path: str | os.PathLike | None = None,
        weights_only: bool = False,
        *,
        asynchronous: bool = False,
        trainable_only: bool = False,
    ) -> Path:
        """Save the training state as a sharded checkpoint directory (every rank must call this).

        Each rank writes its own shards; the directory appears atomically once all have
        finished, and ``<default_root_dir>/checkpoints/last`` then names it. Returns the path;
        the default is ``<default_root_dir>/checkpoints/step=<N>``. With ``asynchronous=True``
        the loop is blocked only while the state is copied to CPU memory; the files are written
        and committed in the background (the next save and the end of ``fit`` wait for it).
        ``weights_only=True``: the model's weights, the loop position and the hyperparameters only (Lightning's),
        for evaluation and ``load_from_checkpoint``, not for resuming training. ``trainable_only=True``: of the
        model, only its trainable parameters (LoRA adapters) with the rest of the training state; it resumes a run
        whose model reads the same pretrained weights (the checkpoint names them), and exports like a whole one.
        """
        if self.model is None:
            raise RuntimeError("save_checkpoint() needs a module that has been set up by fit()")
        state = self.checkpoints.state_of(self, weights_only=weights_only)
        self._call("on_save_checkpoint", state)
        return self.checkpoints.save(state, self.global_step, path, asynchronous, trainable_only)

    def _restore(self, ckpt_path: str | os.PathLike) -> None:
        path = self.checkpoints.resolve(ckpt_path)
        state = self.checkpoints.restore(path, self) if path is not None else None
        if state is None:
            return
        for logger in self._rank_zero_loggers():
            if callable(getattr(logger, "log_resume", None)):  # CSVLogger: continue metrics.csv after a marker row
                logger.log_resume(self.global_step)
        self._call("on_load_checkpoint", state)

    def _checkpoint_for_stop(self) -> Path:
        """The checkpoint of this step: the one just saved, or a new one."""
        self.engine.wait_for_checkpoint()
        last = self.checkpoints.last_saved
        return last[1] if last is not None and last[0] == self.global_step else self.save_checkpoint()

    def _loss_scaling(self) -> bool:
        return self.engine.precision.grad_scaler(self.engine.device.type) is not None

    def _reached_max_steps(self) -> bool:
        return 0 < self.args.max_steps <= self.global_step

    # ------------------------------------------------------------------ logging and hooks
    def _write(
        self, entries: list[Entry], extra: dict[str, float], step: int | None = None, callback_metrics: bool = True
    ) -> dict[str, float]:
        """Reduce ``entries`` (synced ones over ranks, in one collective per kind), update ``callback_metrics`` and
        ``progress_bar_metrics`` (unless ``callback_metrics=False``: per-batch evaluation rows, which Lightning only
        logs) and ``logged_metrics``, and write the loggers' entries (rank 0) with ``extra`` at ``step`` (default:
        Lightning's, see ``batches_that_stepped``); returns every value. Every rank must call this at the same
        point with the same synced names."""
        values = reduce_entries(entries, self.engine.all_reduce)
        if values.pop(_STOP_REQUESTED, 0.0) > 0:
            self._stop.agreed = True
        row: dict[str, float] = {}
        for entry in entries:
            if entry.name not in values:
                continue
            value = values[entry.name]
            if callback_metrics:
                self.callback_metrics[entry.name] = value
                if entry.base_name is not None:  # Lightning's forked metric: the plain name holds the latest value too
                    self.callback_metrics[entry.base_name] = value
                if entry.prog_bar:
                    self.progress_bar_metrics[entry.name] = value
            if entry.logger:
                row[entry.name] = value
        self.logged_metrics.update(row)
        if row and self.is_global_zero:
            row.update(extra)
            step = self._logger_step() if step is None else step
            for callback in self.callbacks:  # first: a callback may add figures to the row (ThroughputMonitor)
                callback.on_log(self, row, self.global_step)  # shardtrain's hook: the optimizer steps done
            for logger in self.loggers:
                logger.log_metrics(row, step)
        return values

    def _end_training_epoch(self) -> None:
        """Lightning's end of a training epoch: the callbacks' ``on_train_epoch_end`` (those that monitor metrics
        last), the module's; its epoch metrics are computed and written before the monitoring callbacks run, so that
        they can monitor what the epoch (and the module's hook) logged."""
        monitoring = [c for c in self.callbacks if getattr(c, "monitors_metrics", False)]
        for callback in self.callbacks:
            if callback not in monitoring:
                callback.on_train_epoch_end(self, self.module)
        with current_hook(self.module, "on_train_epoch_end"):
            self.module.on_train_epoch_end()
        self._results.add(self.module.pop_logged())
        entries = self._results.epoch_entries(self.engine.device)
        if entries:  # at the epoch's last batch's step, as Lightning
            self._write(entries, {"epoch": float(self.current_epoch)}, step=max(self.batches_that_stepped - 1, 0))
        for callback in monitoring:
            callback.on_train_epoch_end(self, self.module)

    def _log_hyperparams(self, module: TrainModule) -> None:
        """Lightning's: the module's and the DataModule's hyperparameters (``save_hyperparameters``) to every logger,
        once the model is set up, on rank 0; then each logger's ``log_graph(module)`` and ``save()``."""
        hparams = merged_for_loggers(module, self.datamodule)  # on every rank: a clash is an error everywhere
        trainer_loggers.log_hyperparams(self._rank_zero_loggers(), hparams, module)

    def _rank_zero_loggers(self) -> list[Logger]:
        return self.loggers if self.is_global_zero else []

    def _call(self, hook: str, *args: Any) -> Any:
        """Run ``hook`` on every callback, then on the module (Lightning's order); ``self.log`` in them follows
        Lightning's rules for ``hook``. Returns what the module's hook returned (``on_train_batch_start``: -1)."""
        with current_hook(self.module, hook) if self.module is not None else contextlib.nullcontext():
            for callback in self.callbacks:
                getattr(callback, hook)(self, self.module, *args)
            module_hook = getattr(self.module, hook, None)
            if callable(module_hook) and hook.startswith("on_"):
                return module_hook(*args)
        return None


def _batches(loader: Any, limit: int | float | None) -> int | float:
    """Batches per epoch of ``loader`` after a ``limit_*_batches`` (inf without a length)."""
    try:
        return limited_batches(len(loader), limit)
    except TypeError:
        return math.inf


_STOP_REQUESTED = "_shardtrain/stop_requested"


def _first_value(values: list[float]) -> float:
    return values[0]


def _refuse_loaders_with_datamodule(stage: str, datamodule: DataModule | None, *loaders: Any) -> None:
    """Lightning's rule: loaders come from the arguments or from the DataModule, not both."""
    if datamodule is not None and any(loader is not None for loader in loaders):
        raise ConfigError(
            f"Trainer.{stage} got both dataloaders and a datamodule: pass the loaders, or the DataModule that makes them"
        )


Trainer.__signature__ = inspect.signature(TrainerArguments)  # type: ignore[attr-defined]  # for help() and IDEs at run time
