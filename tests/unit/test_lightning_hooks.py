"""Every hook of Lightning's LightningModule is called where Lightning calls it, or refused at fit start; with
Lightning itself as the oracle where it is installed (``pip install -e .[dev]``)."""

import inspect

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Callback, ConfigError, TrainModule, Trainer
from shardtrain.trainer.hooks import CALLED, FLAGS, HOOKS, REFUSED, hooks_markdown

#: Methods of LightningModule a user calls rather than overrides: not hooks.
UTILITIES = {
    "all_gather",
    "clip_gradients",
    "freeze",
    "log",
    "log_dict",
    "lr_schedulers",
    "manual_backward",
    "optimizers",
    "print",
    "to_onnx",
    "to_tensorrt",
    "to_torchscript",
    "toggle_optimizer",
    "toggled_optimizer",
    "unfreeze",
    "untoggle_optimizer",
}
#: Lightning 2.6's hooks (ModelHooks, DataHooks, CheckpointHooks and LightningModule's own), for runs without it.
LIGHTNING_HOOKS = """backward configure_callbacks configure_gradient_clipping configure_model configure_optimizers
configure_sharded_model forward lr_scheduler_step on_after_backward on_after_batch_transfer on_before_backward
on_before_batch_transfer on_before_optimizer_step on_before_zero_grad on_fit_end on_fit_start on_load_checkpoint
on_predict_batch_end on_predict_batch_start on_predict_end on_predict_epoch_end on_predict_epoch_start
on_predict_model_eval on_predict_start on_save_checkpoint on_test_batch_end on_test_batch_start on_test_end
on_test_epoch_end on_test_epoch_start on_test_model_eval on_test_model_train on_test_start on_train_batch_end
on_train_batch_start on_train_end on_train_epoch_end on_train_epoch_start on_train_start on_validation_batch_end
on_validation_batch_start on_validation_end on_validation_epoch_end on_validation_epoch_start on_validation_model_eval
on_validation_model_train on_validation_model_zero_grad on_validation_start optimizer_step optimizer_zero_grad
predict_dataloader predict_step prepare_data setup teardown test_dataloader test_step train_dataloader
training_step transfer_batch_to_device val_dataloader validation_step""".split()


def _lightning_hooks() -> set[str]:
    try:
        from lightning.pytorch import LightningModule
        from lightning.pytorch.core.hooks import CheckpointHooks, DataHooks, ModelHooks
    except ImportError:
        return set(LIGHTNING_HOOKS)
    names = {n for c in (ModelHooks, DataHooks, CheckpointHooks) for n, v in vars(c).items() if callable(v)}
    names |= {n for n, v in vars(LightningModule).items() if callable(v)}
    return {n for n in names if not n.startswith("_")} - UTILITIES


def test_every_lightning_hook_is_called_or_refused():
    hooks = _lightning_hooks()
    assert set(LIGHTNING_HOOKS) <= hooks  # the list kept here is Lightning's (no hook dropped from it)
    missing = sorted(hooks - set(HOOKS))
    assert not missing, f"Lightning hooks with no entry in shardtrain.trainer.hooks.HOOKS: {missing}"
    assert {hook.kind for hook in HOOKS.values()} == {CALLED, REFUSED}


def test_the_docs_list_the_table():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "lightning.md").read_text()
    assert hooks_markdown() in doc


class Regression(TrainModule):
    """Layers built in ``__init__``, as Lightning users write them; records the steps it ran."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=64):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))


def _override(name):
    signature = {"setup": "stage", "teardown": "stage"}.get(name, "*args")
    namespace = {}
    exec(f"def {name}(self, {signature}):\n    return None", namespace)
    return type(f"Overrides_{name}", (Regression,), {name: namespace[name]})


@pytest.mark.parametrize("name", sorted(n for n, h in HOOKS.items() if h.kind == REFUSED))
def test_overriding_a_refused_hook_is_an_error_at_fit_start(name, tmp_path):
    module = _override(name)()
    trainer = Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match=rf"\b{name}\b.*not|removed"):
        trainer.fit(module, DataLoader(_data(), batch_size=16))
    assert module.steps == 0 and trainer.global_step == 0 and trainer.model is None


def test_manual_optimization_is_no_longer_a_refused_flag():
    assert "automatic_optimization" not in FLAGS  # supported: tests/unit/test_lightning_manual.py


def test_hooks_that_are_called_are_not_refused(tmp_path):
    calls = []

    class Everything(Regression):
        def prepare_data(self):
            calls.append(("prepare_data",))

        def configure_callbacks(self):
            return [Seen()]

        def setup(self, stage):
            calls.append(("setup", stage))

        def teardown(self, stage):
            calls.append(("teardown", stage))

        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            calls.append(("optimizer_zero_grad", epoch, batch_idx))
            optimizer.zero_grad()

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            calls.append(("configure_gradient_clipping", gradient_clip_val, gradient_clip_algorithm))
            self.clip_gradients(optimizer, gradient_clip_val=1e-9, gradient_clip_algorithm="value")

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def lr_scheduler_step(self, scheduler, metric):
            calls.append(("lr_scheduler_step", metric))
            super().lr_scheduler_step(scheduler, metric)

    class Seen(Callback):
        def on_train_start(self, trainer, module):
            calls.append(("callback from configure_callbacks",))

    module = Everything()
    before = module.net.weight.detach().clone()
    trainer = Trainer(
        max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, gradient_clip_val=0.5
    )
    trainer.fit(module, DataLoader(_data(), batch_size=16))
    assert calls == [
        ("prepare_data",),
        ("setup", "fit"),
        ("callback from configure_callbacks",),
        ("optimizer_zero_grad", 0, 0),  # as Lightning: before the backward of the step's first micro-batch
        ("configure_gradient_clipping", 0.5, "norm"),
        ("lr_scheduler_step", None),
        ("optimizer_zero_grad", 0, 1),
        ("configure_gradient_clipping", 0.5, "norm"),
        ("lr_scheduler_step", None),
        ("teardown", "fit"),
    ]
    # clipped by value to 1e-9 by the module's own clipping: two SGD steps move a weight by at most 2 * 0.1 * 1e-9
    assert (module.net.weight.detach() - before).abs().max() <= 2.1e-10
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def _warmup_module(base, record):
    """The same module for both frameworks: linear warm-up of the lr over 5 steps, set in optimizer_step."""

    class WarmUp(base):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            record["losses"].append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            for group in optimizer.param_groups:
                group["lr"] = 0.05 * min(1.0, (self.trainer.global_step + 1) / 5)
            optimizer.step(closure=optimizer_closure)
            record["lrs"].append(optimizer.param_groups[0]["lr"])
            record["batch_idx"].append((epoch, batch_idx))

    return WarmUp()


def _record():
    return {"losses": [], "lrs": [], "batch_idx": []}


def _fit_shardtrain(tmp_path, steps=12, accumulate=1):
    record = _record()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(_warmup_module(TrainModule, record), DataLoader(_data(), batch_size=8, shuffle=False))
    return record


def test_optimizer_step_override_is_called_and_its_warm_up_trains(tmp_path):
    record = _fit_shardtrain(tmp_path)
    assert record["lrs"] == [0.05 * min(1.0, s / 5) for s in range(1, 13)]
    assert record["batch_idx"] == [(0, b) for b in range(8)] + [(1, b) for b in range(4)]
    assert len(record["losses"]) == 12
    assert sum(record["losses"][-3:]) < 0.5 * sum(record["losses"][:3]), record["losses"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_optimizer_step_matches_lightning(tmp_path, accumulate):
    lightning = pytest.importorskip("lightning.pytorch")
    ours = _fit_shardtrain(tmp_path / "ours", accumulate=accumulate)
    theirs = _record()
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=12,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path / "lightning",
    )
    trainer.fit(_warmup_module(lightning.LightningModule, theirs), DataLoader(_data(), batch_size=8, shuffle=False))
    assert ours["lrs"] == theirs["lrs"]
    assert ours["batch_idx"] == theirs["batch_idx"]
    assert len(ours["losses"]) == len(theirs["losses"]) == 12 * accumulate
    assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-6)


def _order_module(base, calls):
    class Ordered(base):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            calls.append("training_step")
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            calls.append("configure_optimizers")
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def recorder(name):
        def hook(self, *args, **kwargs):
            stage = (
                getattr(args[0] if args else kwargs.get("stage"), "value", None) or (args or [kwargs.get("stage")])[0]
            )
            calls.append(name if name not in ("setup", "teardown") else f"{name}({stage})")
            parent = getattr(super(Ordered, self), name, None)
            return parent(*args, **kwargs) if parent is not None else None

        return hook

    for name in (
        "setup",
        "teardown",
        "configure_model",
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
    ):
        setattr(Ordered, name, recorder(name))
    return Ordered()


class _CallbackRecorder:
    def __init__(self, calls):
        self.calls = calls

    def setup(self, trainer, module, stage):
        self.calls.append(f"callback.setup({getattr(stage, 'value', stage)})")

    def teardown(self, trainer, module, stage):
        self.calls.append(f"callback.teardown({getattr(stage, 'value', stage)})")


def test_setup_and_teardown_are_called_in_lightnings_order(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    ours, theirs = [], []
    callback = type("Recorder", (_CallbackRecorder, Callback), {})(ours)
    # strategy="single": "auto" first measures a trial copy, which runs configure_model/configure_optimizers on it
    Trainer(
        strategy="single",
        max_steps=4,  # one whole epoch (a stop mid-epoch: Lightning also calls on_train_epoch_end)
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        callbacks=[callback],
    ).fit(_order_module(TrainModule, ours), DataLoader(_data(), batch_size=16))
    their_callback = type("Recorder", (_CallbackRecorder, lightning.Callback), {})(theirs)
    lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[their_callback],
        default_root_dir=tmp_path / "lightning",
    ).fit(_order_module(lightning.LightningModule, theirs), DataLoader(_data(), batch_size=16))
    assert ours[:3] == ["callback.setup(fit)", "setup(fit)", "configure_model"]
    assert ours[-2:] == ["callback.teardown(fit)", "teardown(fit)"]
    assert ours == theirs, (ours, theirs)


def test_the_table_names_real_signatures():
    for name in ("optimizer_step", "optimizer_zero_grad", "configure_gradient_clipping", "lr_scheduler_step"):
        assert name in vars(TrainModule), name
        assert list(inspect.signature(getattr(TrainModule, name)).parameters)[0] == "self"


def test_configure_callbacks_replace_the_trainers_of_the_same_type_and_checkpoints_go_last(tmp_path):
    from shardtrain import ModelCheckpoint

    class Tagged(Callback):
        def __init__(self, tag):
            self.tag = tag

    class WithCallbacks(Regression):
        def configure_callbacks(self):
            return [Tagged("module"), ModelCheckpoint(every_n_train_steps=100)]

    trainer = Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, callbacks=[Tagged("trainer")])
    trainer.fit(WithCallbacks(), DataLoader(_data(), batch_size=16))
    tagged = [c.tag for c in trainer.callbacks if isinstance(c, Tagged)]
    assert tagged == ["module"]
    assert isinstance(trainer.callbacks[-1], ModelCheckpoint)


class OwnBackward(Regression):
    def backward(self, loss, *args, **kwargs):
        loss.backward(*args, **kwargs)


def _deepspeed():
    pytest.importorskip("deepspeed")
    return "deepspeed"


@pytest.mark.parametrize(
    ("strategy", "devices"),
    [
        pytest.param("deepspeed", 1, id="deepspeed"),
        pytest.param("pipeline", 2, id="pipeline"),
    ],
)
def test_an_overridden_backward_is_refused_where_the_strategy_runs_backward_itself(strategy, devices, tmp_path):
    from shardtrain.strategies.model_parallel import ModelParallelStrategy

    chosen = _deepspeed() if strategy == "deepspeed" else ModelParallelStrategy(pipeline_parallel_size=2)
    module = OwnBackward()
    trainer = Trainer(
        accelerator="cpu", strategy=chosen, devices=devices, max_steps=2, default_root_dir=tmp_path, logger=False
    )
    with pytest.raises(ConfigError, match=r"OwnBackward overrides backward, which strategy .* does not call"):
        trainer.fit(module, DataLoader(_data(), batch_size=16))
    assert module.steps == 0 and trainer.model is None  # before any process group or step


def _grad_watcher(base, seen):
    class Watcher(base):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):  # the forward: do last step's gradients still take memory?
            seen.append(any(p.grad is not None for p in self.parameters()))
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Watcher()


class _ReadsGradients(Callback):
    def on_before_zero_grad(self, trainer, module, optimizer):
        pass


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_after_a_step_unless_a_hook_could_see_them(tmp_path, accumulate):
    """The next forward does not run beside the last step's gradients (a hand-written loop's memory); with a hook
    that sees them before they are zeroed (on_before_zero_grad), Lightning's timing, as Lightning itself shows."""
    kwargs = dict(max_steps=3, accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False)
    freed: list[bool] = []
    Trainer(default_root_dir=tmp_path / "a", **kwargs).fit(_grad_watcher(TrainModule, freed), _regression_loader())
    # accumulating: the second micro-batch's forward runs beside the first one's gradients, as it must
    assert freed == [False] * 3 if accumulate == 1 else [False, True] * 3
    kept: list[bool] = []
    trainer = Trainer(default_root_dir=tmp_path / "b", callbacks=[_ReadsGradients()], **kwargs)
    trainer.fit(_grad_watcher(TrainModule, kept), _regression_loader())
    assert kept == ([False] + [True] * 2 if accumulate == 1 else [False, True] + [True, True] * 2)
    lightning = pytest.importorskip("lightning.pytorch")
    theirs: list[bool] = []
    lightning.Trainer(
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
        default_root_dir=tmp_path / "lightning", **kwargs,
    ).fit(_grad_watcher(lightning.LightningModule, theirs), _regression_loader())  # fmt: skip
    assert kept == theirs


def _regression_loader():
    return DataLoader(_data(), batch_size=8)


@pytest.mark.parametrize("strategy", ["single", "model_parallel"])
def test_an_overridden_backward_runs_in_place_of_the_strategys(strategy, tmp_path):
    """The docs' claim for the strategies that take it on one process (ddp and fsdp on 2: the basic oracle)."""
    losses = []

    class Counted(Regression):
        def backward(self, loss, *args, **kwargs):
            losses.append(float(loss))
            loss.backward(*args, **kwargs)

    trainer = Trainer(
        accelerator="cpu", strategy=strategy, devices=1, max_steps=3, accumulate_grad_batches=2,
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_checkpointing=False,
    )  # fmt: skip
    module = Counted()
    try:
        trainer.fit(module, DataLoader(_data(), batch_size=8))
    finally:  # model_parallel joined a one-process group: leave none behind for the tests after this one
        from shardtrain.launch.process_group import destroy_process_group

        destroy_process_group()
    assert len(losses) == module.steps == 6 and trainer.global_step == 3  # every micro-batch's backward
