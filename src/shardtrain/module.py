"""TrainModule: the class a user subclasses. Hook names follow Lightning's, so code ports by changing the base class."""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from shardtrain.batch_transfer import BatchTransferHooks
from shardtrain.errors import ConfigError, TrainingStepError
from shardtrain.logged import LoggedValue, reduction, step_and_epoch
from shardtrain.hparams import HyperparametersMixin

if TYPE_CHECKING:
    from typing_extensions import Self

    from torch.distributed.device_mesh import DeviceMesh

    from shardtrain.loggers import Logger

    from shardtrain.trainer.trainer import Trainer

StepOutput = torch.Tensor | Mapping[str, Any]


class TrainModule(BatchTransferHooks, HyperparametersMixin, nn.Module):
    """A model plus how to train it.

    Override:
        ``configure_model()``: optional; layers built here rather than in ``__init__`` can be built on the
            meta device by sharding strategies, which then materialise only each rank's shard (the way for
            models too large for one device). Layers built in ``__init__``, Lightning's common style, work too.
        ``training_step(batch, batch_idx)``: return the loss, or a dict with a ``"loss"`` entry.
            ``training_step(batch)`` works too: as in Lightning, the Trainer reads the step's
            signature (once) and passes ``batch_idx`` only to a step that takes it.
        ``validation_step(batch, batch_idx)``: optional; log what you want to see. ``validation_step(batch)``
            works too.
        ``configure_optimizers()``: an optimizer; or ``(optimizer, lr_scheduler)``; or
            ``([optimizers], [schedulers])``; or Lightning's dict
            ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval": "step"}}``.
        ``train_dataloader()`` / ``val_dataloader()``: optional, when no loaders are passed to ``fit``.
        Any ``on_*`` hook of :class:`shardtrain.callbacks.Callback` (without the trainer/module arguments).
        Lightning's ``setup``/``teardown(stage)``, ``optimizer_step``, ``optimizer_zero_grad``,
        ``configure_gradient_clipping``, ``lr_scheduler_step``, ``backward`` and the batch-transfer hooks
        (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``); every other
        Lightning hook is refused when overridden (``shardtrain.trainer.hooks``, docs/lightning.md).
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: Trainer | None = None
        self._logged: dict[str, LoggedValue] = {}

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint``: the module built again with the hyperparameters the checkpoint
        recorded (``save_hyperparameters``; ``kwargs`` override them, and give those it could not record), its
        ``configure_model()`` run, ``on_load_checkpoint(checkpoint)`` called, and the saved weights loaded
        (``strict`` by default) on the CPU (or ``map_location``). ``checkpoint_path``: a Trainer checkpoint
        directory of any strategy and world size, or consolidated weights (then ``kwargs`` give every argument)."""
        from shardtrain.from_checkpoint import load_module

        return load_module(cls, TrainModule, checkpoint_path, map_location, hparams_file, strict, **kwargs)

    # -------------------------------------------------------------- hooks to override
    def configure_model(self) -> None:
        """Create the layers. Called once per run, under the strategy's init context."""

    def training_step(self, batch: Any, batch_idx: int) -> StepOutput:
        """By default, for a module that defines ``pipeline_inputs`` and ``pipeline_loss``:
        ``pipeline_loss(model(*inputs), targets)``, ``model`` being ``pipelined_model()``."""
        if self._defines_pipeline_contract():
            return self._pipeline_contract_loss(batch)
        raise NotImplementedError(
            f"{type(self).__name__} must define training_step(batch, batch_idx) returning the loss "
            "(or pipeline_inputs and pipeline_loss)"
        )

    def validation_step(self, batch: Any, batch_idx: int) -> StepOutput | None:
        """By default nothing; for a module that defines ``pipeline_inputs`` and ``pipeline_loss``, it logs
        ``val_loss`` (what pipeline parallelism's validation logs too)."""
        if self._defines_pipeline_contract():
            self.log("val_loss", self._pipeline_contract_loss(batch), prog_bar=True, sync_dist=True)
        return None

    # -------------------------------------------------------------- the pipeline contract
    #: The name of the child that pipeline parallelism splits into stages; None: the child that
    #: holds the largest ``nn.ModuleList`` (the blocks).
    pipeline_module: str | None = None

    # Define both to train under pipeline parallelism (and, with no training_step, under every strategy):
    #   pipeline_inputs(batch) -> (inputs, targets): the pipelined model's positional inputs (a tensor
    #       or a tuple of tensors, the last of which may be a dict of keyword inputs; all split into
    #       micro-batches along dimension 0) and the loss's targets (a tensor);
    #   pipeline_loss(outputs, targets) -> loss: on the last stage, for one micro-batch.

    def pipelined_model(self) -> tuple[str, nn.Module]:
        """The name and module of the model pipeline parallelism splits: ``pipeline_module``, or the child
        that holds the largest ``nn.ModuleList`` (by parameter count)."""
        found = self.__dict__.get("_pipelined_name")
        if found is not None:  # found once: the default training_step asks every step
            return found, self.get_submodule(found)
        name, model = self._find_pipelined_model()
        self.__dict__["_pipelined_name"] = name
        return name, model

    def _find_pipelined_model(self) -> tuple[str, nn.Module]:
        if self.pipeline_module is not None:
            try:
                return self.pipeline_module, self.get_submodule(self.pipeline_module)
            except AttributeError:
                raise TrainingStepError(
                    f"{type(self).__name__}.pipeline_module = {self.pipeline_module!r} names no submodule"
                ) from None
        best: tuple[int, str, nn.Module] | None = None
        for name, child in self.named_children():
            for inner in child.modules():
                if isinstance(inner, nn.ModuleList) and len(inner) > 0:
                    size = sum(p.numel() for p in inner.parameters())
                    if best is None or size > best[0]:
                        best = (size, name, child)
        if best is None:
            raise TrainingStepError(
                f"{type(self).__name__} has no child holding an nn.ModuleList of blocks to pipeline; build the model "
                "in configure_model() with its blocks in an nn.ModuleList, or set pipeline_module"
            )
        return best[1], best[2]

    # -------------------------------------------------------------- the context-parallel contract
    # Define to train under context parallelism (ModelParallelStrategy(context_parallel_size=N)):
    #   context_parallel_inputs(batch) -> [(tensor, sequence dim), ...]: the batch's tensors that run along the
    #       sequence (token ids, and targets already shifted over the whole sequence: a shift after the split
    #       would be wrong at the chunks' edges); each is split in place over the cp ranks before training_step
    #       sees the batch. Attention must be F.scaled_dot_product_attention(..., is_causal=True), and position
    #       embeddings come from shardtrain.sequence_positions(length, device) rather than arange.

    def _defines_pipeline_contract(self) -> bool:
        return callable(getattr(self, "pipeline_inputs", None)) and callable(getattr(self, "pipeline_loss", None))

    def _pipeline_contract_loss(self, batch: Any) -> torch.Tensor:
        inputs, targets = self.pipeline_inputs(batch)  # type: ignore[attr-defined]
        args, kwargs = pipeline_call(inputs)
        return self.pipeline_loss(self.pipelined_model()[1](*args, **kwargs), targets)  # type: ignore[attr-defined]

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define configure_optimizers() returning an optimizer")

    # -------------------------------------------------------------- Lightning's optimization hooks
    # Each is called only where the module overrides it (``shardtrain.trainer.hooks`` lists every hook); these
    # defaults do what the Trainer does without them, so that an override may call ``super()``.
    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """Step ``optimizer``. Backward has already run when this is called: ``optimizer_closure()`` returns the
        step's loss without recomputing it; ``optimizer.step(closure=optimizer_closure)`` runs the hooks before the
        step (``on_before_optimizer_step``), gradient clipping and the strategy's step, as in Lightning."""
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Run backward of ``loss``: the training step's loss divided by ``accumulate_grad_batches`` and scaled by the
        precision's gradient scaler (fp16), as Lightning gives it; ``manual_backward``'s extra arguments follow it.
        Called by the strategy in place of ``loss.backward()`` under single, ddp, fsdp and model_parallel without
        pipeline stages; overriding it is refused where DeepSpeed's engine or a pipeline schedule runs backward."""
        loss.backward(*args, **kwargs)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients of ``optimizer``'s parameters by norm (the default) or by value, through the strategy
        (over the whole gradient: every shard and rank). In manual optimization, call it after ``manual_backward``
        and before ``optimizer.step()``."""
        if gradient_clip_val is None:
            return
        algorithm = gradient_clip_algorithm or "norm"
        if algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
        manual = self.trainer.manual_optimization
        if manual is not None:  # the gradients are averaged over the ranks first (DDP defers it to here)
            manual.clip_gradients(optimizer, gradient_clip_val, algorithm)
            return
        engine, model = self.trainer.engine, self.trainer.model
        if algorithm == "norm":
            engine.clip_gradients(model, optimizer, max_norm=gradient_clip_val)
        else:
            engine.clip_gradients(model, optimizer, clip_val=gradient_clip_val)

    # -------------------------------------------------------------- manual optimization (Lightning's names)
    #: Set ``self.automatic_optimization = False`` to step the optimizers yourself in ``training_step``: the
    #: Trainer then runs no backward, step, zero_grad, clipping or scheduler step (``trainer.manual_optimization``).
    automatic_optimization: bool = True

    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        """The optimizers of ``configure_optimizers()``: one, or a list in their order. Each is wrapped as Lightning's
        ``LightningOptimizer``: ``step(closure=None)`` runs ``on_before_optimizer_step`` and the strategy's step
        and counts in ``global_step``; ``use_pl_optimizer=False`` gives the set-up optimizers unwrapped."""
        manual = self.trainer.manual_optimization
        if manual is not None:
            return manual.optimizers(use_pl_optimizer)
        found = list(self.trainer.optimizers)  # automatic optimization: read them (the Trainer steps them)
        return found[0] if len(found) == 1 else found

    def lr_schedulers(self) -> Any:
        """The LR schedulers of ``configure_optimizers()``: None, one, or a list; step them yourself (``sch.step()``)."""
        schedulers = [config.scheduler for config in self.trainer.lr_schedulers]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward of ``loss`` as the strategy runs it (loss scaling, FSDP's reduce-scatter, DeepSpeed's engine),
        between ``on_before_backward`` and ``on_after_backward``; call it in place of ``loss.backward()``.
        ``args``/``kwargs`` (e.g. ``retain_graph=True``) go to ``backward(loss, *args, **kwargs)``, as in Lightning."""
        self._manual_optimization("manual_backward").backward(loss, *args, **kwargs)

    def toggle_optimizer(self, optimizer: Any) -> None:
        """Only ``optimizer``'s parameters require gradients until ``untoggle_optimizer(optimizer)`` (the other
        optimizers' are frozen, so a backward computes no gradient for them), as in Lightning."""
        state: dict[torch.Tensor, bool] = {}
        for opt in self.trainer.optimizers:
            for param in _parameters_of(opt):
                if param not in state:
                    state[param] = param.requires_grad
                    param.requires_grad = False
        for param in _parameters_of(optimizer):
            param.requires_grad = state[param]
        self.__dict__["_param_requires_grad_state"] = state

    def untoggle_optimizer(self, optimizer: Any) -> None:
        """Give the parameters ``toggle_optimizer(optimizer)`` froze back the ``requires_grad`` they had."""
        state = self.__dict__.pop("_param_requires_grad_state", {})
        chosen = getattr(optimizer, "optimizer", optimizer)  # Lightning's optimizer wrapper, or the optimizer
        for opt in self.trainer.optimizers:
            if opt is not optimizer and opt is not chosen:
                for param in _parameters_of(opt):
                    if param in state:
                        param.requires_grad = state[param]

    @contextlib.contextmanager
    def toggled_optimizer(self, optimizer: Any) -> Iterator[None]:
        """``toggle_optimizer`` and ``untoggle_optimizer`` as a context manager."""
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    def _manual_optimization(self, what: str) -> Any:
        manual = self.trainer.manual_optimization
        if manual is None:
            if self.automatic_optimization:
                raise ConfigError(
                    f"{what}() is for manual optimization: set self.automatic_optimization = False in "
                    f"{type(self).__name__}.__init__ (the Trainer then runs no backward or step of its own)"
                )
            raise RuntimeError(f"{what}() needs the optimizers: call it in training_step, during fit")
        return manual

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    # -------------------------------------------------------------- Lightning's evaluation-mode hooks
    # The evaluation loop calls each only where it is overridden and does the same itself otherwise (it also puts
    # each submodule back in the mode it was in); these defaults are what ``super()`` does in an override.
    def on_validation_model_eval(self) -> None:
        self.trainer.model.eval()

    def on_validation_model_train(self) -> None:
        self.trainer.model.train()

    def on_validation_model_zero_grad(self) -> None:
        self.zero_grad(set_to_none=True)

    def on_test_model_eval(self) -> None:
        self.trainer.model.eval()

    def on_test_model_train(self) -> None:
        self.trainer.model.train()

    def on_predict_model_eval(self) -> None:
        self.trainer.model.eval()

    # -------------------------------------------------------------- services for hooks
    def _step_arguments(self, step: str, batch: Any, batch_idx: int) -> tuple[Any, ...]:
        """``(batch, batch_idx)``, or ``(batch,)`` for a ``step`` written without ``batch_idx``.

        The signature is read on the first call and remembered, not inspected on every step.
        """
        takes = self.__dict__.setdefault("_step_takes_batch_idx", {})
        if step not in takes:
            takes[step] = takes_batch_idx(getattr(self, step))
        return (batch, batch_idx) if takes[step] else (batch,)

    @property
    def trainer(self) -> "Trainer":
        if self._trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer")
        return self._trainer

    @property
    def logger(self) -> "Logger | None":
        """The Trainer's first logger (None when there is none or no Trainer), as Lightning's ``self.logger``."""
        return self._trainer.logger if self._trainer is not None else None

    @property
    def loggers(self) -> "list[Logger]":
        """The Trainer's loggers (``[]`` without a Trainer), as Lightning's ``self.loggers``."""
        return self._trainer.loggers if self._trainer is not None else []

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    @property
    def device_mesh(self) -> "DeviceMesh | None":
        """The run's device mesh, for ``configure_model()`` to parallelise the model itself (Lightning's
        contract): ``self.device_mesh["tp"]`` for tensor parallelism, ``["dp_shard"]`` for FSDP (see
        ``shardtrain.parallel.dims``). None when the module is not attached to a launched Trainer, or its
        strategy runs without a process group (``single``)."""
        if self._trainer is None or not (dist.is_available() and dist.is_initialized()):
            return None
        return self._trainer.engine.device_mesh

    @property
    def global_rank(self) -> int:
        return self._trainer.global_rank if self._trainer else 0

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer else 0

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer else 0

    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str | Callable[..., Any] = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        metric_attribute: str | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        """Record a metric, with Lightning's options and meaning (docs/lightning.md, "Logging").

        ``value``: a number, a one-element tensor, or a torchmetrics ``Metric`` (computed and reset at epoch end).
        ``on_step``/``on_epoch`` default by hook as in Lightning (per step in training, per epoch in evaluation
        and the epoch hooks); with both, the loggers get ``name_step`` and ``name_epoch``. Epoch values are
        reduced with ``reduce_fx`` over the epoch's batches, a mean weighted by ``batch_size`` (default: the
        batch's first dimension). Each rank's own value is logged (rank 0's reaches the loggers) unless
        ``sync_dist=True``: then it is reduced over ranks with ``reduce_fx``, in one collective with the other
        synced metrics when they are written. No host sync happens when you call this."""
        if sync_dist_group is not None:
            raise ConfigError(f"self.log({name!r}, sync_dist_group=...): only the whole run's group is supported")
        hook = self.__dict__.get("_current_hook")
        step, epoch = step_and_epoch(hook, name, on_step, on_epoch) if hook is not None else (True, False)
        if hook is not None and hook.startswith(("on_predict", "predict")):
            raise ConfigError(f"self.log({name!r}, ...) in {hook}: Lightning refuses logging in predict")
        if not (callable(getattr(value, "compute", None)) and callable(getattr(value, "reset", None))):
            value = _as_scalar(name, value, enable_graph)
        self._logged[name] = LoggedValue(
            value=value,
            prog_bar=prog_bar,
            logger=True if logger is None else bool(logger),
            on_step=step,
            on_epoch=epoch,
            reduce_fx=reduction(reduce_fx, name),
            sync_dist=sync_dist,
            batch_size=batch_size,
            rank_zero_only=rank_zero_only,
            dataloader_idx=None if add_dataloader_idx else -1,
        )

    def log_dict(self, dictionary: Mapping[str, Any], **options: Any) -> None:
        """``self.log`` of every item, with the same options (Lightning's ``log_dict``)."""
        for name, value in dictionary.items():
            self.log(name, value, **options)

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.global_rank == 0:
            print(*args, **kwargs)

    def pop_logged(self) -> dict[str, LoggedValue]:
        """The metrics logged since the last call (used by the Trainer)."""
        logged, self._logged = self._logged, {}
        return logged


# Lightning's ``on_*`` hooks, each a method that does nothing unless overridden (as in Lightning's ``ModelHooks``), so
# that an override may call ``super()``; ``shardtrain.trainer.hooks`` says where each is called.
_NO_OP_HOOKS = (
    "on_fit_start",
    "on_fit_end",
    "on_train_start",
    "on_train_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_save_checkpoint",
    "on_load_checkpoint",
    *(
        f"on_{stage}_{event}"
        for stage in ("validation", "test", "predict")
        for event in ("start", "end", "epoch_start", "epoch_end", "batch_start", "batch_end")
    ),
)


def _no_op_hook(name: str) -> Callable[..., None]:
    def hook(self: TrainModule, *args: Any, **kwargs: Any) -> None:
        return None

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"Lightning's ``{name}``: does nothing unless overridden (see docs/lightning.md for when it runs)."
    return hook


for _name in _NO_OP_HOOKS:
    setattr(TrainModule, _name, _no_op_hook(_name))


def _as_scalar(name: str, value: Any, keep_graph: bool) -> torch.Tensor:
    """A logged number as a 0-d tensor (a DTensor whole; detached unless ``enable_graph``)."""
    if isinstance(value, torch.Tensor):
        value = value if keep_graph else value.detach()
        if hasattr(value, "full_tensor"):  # a DTensor (a loss from split logits): its whole value
            value = value.full_tensor()
        if value.numel() != 1:
            raise ValueError(
                f"self.log({name!r}, ...) needs a single number, got a tensor of shape {tuple(value.shape)}"
            )
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"self.log({name!r}, ...) takes a number, a tensor or a torchmetrics Metric, got {value!r}")
    return torch.tensor(float(value))


def _parameters_of(optimizer: Any) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def takes_batch_idx(step: Callable[..., Any]) -> bool:
    """Whether a bound step method accepts ``batch_idx`` after ``batch`` (Lightning's ``is_param_in_hook_signature``).

    It does when it takes ``*args`` or at least two positional parameters, whatever the second is
    called (``batch_idx``, ``idx``).
    """
    parameters = inspect.signature(step).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2  # batch_idx is passed by position: a keyword-only one is left at its default


def extract_loss(outputs: Any, module_name: str) -> torch.Tensor:
    """The loss a ``training_step`` returned (a tensor, or a dict with ``"loss"``), checked."""
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


def pipeline_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of the pipelined model in what ``pipeline_inputs`` returns: a tensor,
    or a tuple whose last item may be a dict of keyword inputs."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if inputs and isinstance(inputs[-1], Mapping):
        return inputs[:-1], dict(inputs[-1])
    return inputs, {}
