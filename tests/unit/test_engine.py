"""The Engine in one process, through its public API only: argument checks, the order of calls,
clipping, the user's optimizer class and LR schedulers, a save/load round trip, teardown, and
data placement at world size 1. No process group is made here (strategy ``single``)."""

from collections import namedtuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import ConfigError, Engine, SingleDeviceStrategy, StrategyError
from tests.distributed.runner import LAYOUT_VARIABLES


@pytest.fixture(autouse=True)
def no_outer_layout(monkeypatch):
    """No launcher's layout leaks in (an in-process DeepSpeed run sets RANK and the like)."""
    for key in (*LAYOUT_VARIABLES, "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)


def _engine(**kwargs) -> Engine:
    engine = Engine(accelerator="cpu", devices=1, strategy="single", **kwargs)
    engine.launch()
    return engine


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _with_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _backward(engine, model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator) * 10
    loss = torch.nn.functional.mse_loss(model(x), y)
    engine.backward(loss, model)
    return loss


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("devices", [0, -1, 1.5, "two"])
def test_devices_must_be_a_whole_number_of_at_least_one(devices):
    with pytest.raises(ConfigError, match=r"devices must be a whole number >= 1 or 'auto'"):
        Engine(accelerator="cpu", devices=devices)


def test_an_unknown_accelerator_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown accelerator 'tpu'; choose 'auto', 'cpu' or 'cuda'"):
        Engine(accelerator="tpu", devices=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_refused():
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        Engine(accelerator="cuda", devices=1)


@pytest.mark.parametrize("num_nodes", [0, -2, 1.0])
def test_num_nodes_must_be_a_whole_number_of_at_least_one(num_nodes):
    with pytest.raises(ConfigError, match=r"num_nodes must be a whole number >= 1"):
        Engine(accelerator="cpu", devices=1, num_nodes=num_nodes)


def test_several_nodes_need_the_main_port_before_any_process_starts():
    with pytest.raises(ConfigError, match="num_nodes=2 needs the main port"):
        Engine(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp")


def test_strategy_names_and_world_sizes_are_checked_when_the_engine_is_made():
    with pytest.raises(StrategyError, match="unknown strategy 'dpp'"):
        Engine(accelerator="cpu", devices=1, strategy="dpp")
    with pytest.raises(StrategyError, match="strategy 'single' runs one process, but 2 were asked for"):
        Engine(accelerator="cpu", devices=2, strategy="single")
    assert not torch.distributed.is_initialized(), "nothing may start before the checks pass"


# ---------------------------------------------------------------------------- the order of calls
@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda engine: engine.setup(_model()), "setup"),
        (lambda engine: engine.setup(*_with_optimizer()), "setup"),
        (lambda engine: engine.init_module(), "init_module"),
        (lambda engine: engine.setup_dataloaders(DataLoader(TensorDataset(torch.zeros(4, 1)))), "setup_dataloaders"),
    ],
    ids=["setup(model)", "setup(model, optimizer)", "init_module", "setup_dataloaders"],
)
def test_set_up_before_launch_raises(call, name):
    engine = Engine(accelerator="cpu", devices=1, strategy="single")
    with pytest.raises(RuntimeError, match=rf"call engine.launch\(\) before engine.{name}\(\)"):
        call(engine)


def test_launch_runs_a_function_and_gives_the_layout_of_one_process():
    engine = Engine(accelerator="cpu", devices=1, strategy="single")
    assert engine.launch(lambda e, offset: e.world_size * 10 + e.global_rank + offset, 5) == 15
    assert engine.launch() is None  # a second launch starts nothing
    assert (engine.world_size, engine.global_rank, engine.device) == (1, 0, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    assert torch.equal(engine.all_reduce(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------------------- clipping
def test_clip_gradients_takes_exactly_one_of_max_norm_and_clip_val():
    engine = _engine()
    model, optimizer = engine.setup(*_with_optimizer())
    _backward(engine, model)
    for kwargs in ({}, {"max_norm": 1.0, "clip_val": 0.1}):
        with pytest.raises(ConfigError, match="exactly one of max_norm and clip_val"):
            engine.clip_gradients(model, optimizer, **kwargs)


def test_clip_by_norm_returns_the_norm_before_clipping_and_clips_to_max_norm():
    engine = _engine()
    model, optimizer = engine.setup(*_with_optimizer())
    _backward(engine, model)
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert expected > 1.0, "the test needs a norm above max_norm"

    norm = engine.clip_gradients(model, optimizer, max_norm=1.0)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert after.item() == pytest.approx(1.0, rel=1e-5)
    for before, param in zip(grads, model.parameters()):  # scaled, not changed in direction
        assert torch.allclose(param.grad, before * (after / expected), atol=1e-7)


def test_clip_by_value_clamps_every_gradient_and_returns_none():
    engine = _engine()
    model, optimizer = engine.setup(*_with_optimizer())
    _backward(engine, model)
    grads = [p.grad.clone() for p in model.parameters()]
    assert max(g.abs().max().item() for g in grads) > 0.05, "the test needs gradients above clip_val"

    assert engine.clip_gradients(model, optimizer, clip_val=0.05) is None
    for before, param in zip(grads, model.parameters()):
        assert torch.equal(param.grad, before.clamp(-0.05, 0.05))


# ---------------------------------------------------------------------------- optimizers
def test_a_set_up_optimizer_is_the_users_class_and_an_lr_scheduler_drives_it():
    engine = _engine()
    model = _model()
    user_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = engine.setup(model, user_optimizer)
    assert isinstance(optimizer, torch.optim.SGD) and isinstance(optimizer, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)

    for step, lr in enumerate([0.1, 0.05, 0.025]):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
        assert user_optimizer.param_groups[0]["lr"] == pytest.approx(lr), "the groups are shared"
        _backward(engine, model, seed=step)
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        for old, grad, param in zip(before, grads, model.parameters()):  # plain SGD: p -= lr * grad
            assert torch.allclose(param.detach(), old - lr * grad, atol=1e-7)
            assert param.grad is None
    assert scheduler.get_last_lr() == [pytest.approx(0.0125)]


# ---------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip_restores_every_tensor(tmp_path):
    engine = _engine()
    model = _model(seed=0)
    model, optimizer = engine.setup(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    for step in range(2):
        _backward(engine, model, seed=step)
        optimizer.step()
        optimizer.zero_grad()
    counter = torch.arange(3.0)
    engine.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "step": 2, "counter": counter})

    fresh = _model(seed=1)
    fresh, fresh_optimizer = engine.setup(fresh, torch.optim.AdamW(fresh.parameters(), lr=0.01))
    assert not torch.equal(fresh.state_dict()["0.weight"], model.state_dict()["0.weight"])
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": -1, "counter": torch.zeros(3)}
    assert engine.load(tmp_path / "ckpt", state) == {}

    assert state["step"] == 2
    assert torch.equal(state["counter"], counter)
    expected, loaded = model.state_dict(), fresh.state_dict()
    assert expected.keys() == loaded.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key
    saved_state, loaded_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert sorted(saved_state) == sorted(loaded_state) and len(saved_state) == 4
    for index in saved_state:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded_state[index][key], saved_state[index][key]), (index, key)


# ---------------------------------------------------------------------------- teardown
class CountingStrategy(SingleDeviceStrategy):
    def __init__(self):
        super().__init__()
        self.teardowns = 0

    def teardown(self):
        self.teardowns += 1


def test_teardown_is_idempotent_until_the_next_setup():
    strategy = CountingStrategy()
    engine = Engine(accelerator="cpu", devices=1, strategy=strategy)
    engine.launch()
    engine.teardown()  # nothing set up: nothing to release
    assert strategy.teardowns == 0
    model, _ = engine.setup(*_with_optimizer())
    engine.teardown()
    engine.teardown()
    assert strategy.teardowns == 1
    engine.setup(*_with_optimizer())
    engine.teardown()
    engine.teardown()
    assert strategy.teardowns == 2
    assert model.state_dict()["0.weight"].shape == (8, 4), "the model stays readable after teardown"


# ---------------------------------------------------------------------------- data
def test_to_device_moves_every_tensor_of_a_nested_batch_and_keeps_the_rest():
    engine = _engine()
    Pair = namedtuple("Pair", "x y")
    batch = {"pair": Pair(torch.ones(2), torch.zeros(1, dtype=torch.long)), "list": [torch.ones(1), "text", 3]}
    moved = engine.to_device(batch)
    assert isinstance(moved["pair"], Pair) and moved["list"][1:] == ["text", 3]
    assert torch.equal(moved["pair"].x, torch.ones(2)) and moved["pair"].y.dtype == torch.long
    assert {t.device for t in (moved["pair"].x, moved["pair"].y, moved["list"][0])} == {engine.device}


def test_setup_dataloaders_at_world_size_one_keeps_every_sample_and_the_batch_size():
    engine = _engine()
    data = TensorDataset(torch.arange(10.0))
    ordered = engine.setup_dataloaders(DataLoader(data, batch_size=4))
    assert [batch[0].tolist() for batch in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    shuffled, dropping = engine.setup_dataloaders(
        DataLoader(data, batch_size=4, shuffle=True), DataLoader(data, batch_size=4, drop_last=True)
    )
    batches = [batch[0] for batch in shuffled]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [batch[0].tolist() for batch in dropping] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(batch[0].device == engine.device for batch in shuffled)


def test_a_scheduler_built_on_the_optimizer_keeps_driving_it_after_a_load(tmp_path):
    """Loading replaces the optimizer's parameter groups; the scheduler (built on what setup returned) must then
    change the groups the optimizer steps with, and the saved learning rate must be the one in effect."""

    def run(resume_from=None):
        engine = _engine()
        model, optimizer = engine.setup(*_with_optimizer())
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        if resume_from is not None:
            state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
            engine.load(resume_from, state)
        lrs = []
        for step in range(2):
            _backward(engine, model, seed=step)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            lrs.append(optimizer.optimizer.param_groups[0]["lr"])  # the groups the strategy steps with
        if resume_from is None:
            engine.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "scheduler": scheduler})
        return lrs, optimizer.param_groups[0]["lr"]

    first, _ = run()
    assert first == [0.05, 0.025]
    resumed, seen_by_user = run(resume_from=tmp_path / "ckpt")
    assert resumed == [0.0125, 0.00625]  # the schedule continues from the saved lr, and reaches the optimizer
    assert seen_by_user == 0.00625
