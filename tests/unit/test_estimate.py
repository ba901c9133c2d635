"""The memory estimator: exact counts from the meta device, nothing allocated, clear errors."""

import resource
from dataclasses import replace

import pytest
import torch
from torch import nn

from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import ConfigError, TrainModule
from shardtrain.estimate.table import estimate_memory, parse_memory_size


def test_a_7b_model_is_estimated_without_allocating_it():
    config = GPTConfig(vocab_size=32000, d_model=4096, n_layer=32, n_head=32, seq_len=4096)  # Llama-7B-shaped widths
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    estimate = estimate_memory(GPTModule(config), devices=8, num_nodes=4)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert estimate.parameters == config.num_parameters  # 6.59B
    assert estimate.parameter_bytes == 4 * config.num_parameters
    assert estimate.optimizer_bytes == 8 * config.num_parameters  # AdamW: two fp32 moments, read from the optimizer
    assert growth < 300 * 2**20, f"estimating allocated {growth / 2**20:.0f} MiB"
    fsdp = estimate.get("fsdp")
    assert fsdp.parameters == estimate.parameter_bytes // 32


def test_optimizer_state_is_read_from_the_optimizer():
    class SGDModel(TrainModule):
        def configure_model(self):
            self.layer = nn.Linear(100, 100)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    estimate = estimate_memory(SGDModel())
    assert estimate.optimizer_bytes == estimate.parameter_bytes  # one momentum buffer


def test_frozen_parameters_have_no_gradient_or_optimizer_state_and_a_step_may_leave_out_batch_idx():
    class Adapted(TrainModule):  # a frozen base and a small trained part, as a LoRA fine-tune holds
        def configure_model(self):
            self.base = nn.Linear(100, 100).requires_grad_(False)
            self.adapter = nn.Linear(100, 4)

        def training_step(self, batch):
            return self.adapter(self.base(batch)).sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    estimate = estimate_memory(Adapted(), batch=torch.zeros(2, 100))
    assert (estimate.parameters, estimate.trainable_parameters) == (100 * 100 + 100 + 4 * 100 + 4, 4 * 100 + 4)
    assert estimate.optimizer_bytes == 8 * estimate.trainable_parameters  # AdamW's two fp32 moments, adapters only
    assert estimate.get("single").gradients == 4 * estimate.trainable_parameters


def test_a_frozen_base_in_bf16_halves_its_bytes_and_leaves_the_trained_parts_fp32():
    class Adapted(TrainModule):  # frozen_dtype="bf16": the base in bf16, the adapter in fp32
        def configure_model(self):
            self.base = nn.Linear(100, 100).requires_grad_(False).to(torch.bfloat16)
            self.adapter = nn.Linear(100, 4)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    estimate = estimate_memory(Adapted(), devices=2)
    trained = 4 * 100 + 4
    assert estimate.parameter_bytes == 2 * (100 * 100 + 100) + 4 * trained
    assert estimate.get("ddp").gradients == 4 * trained  # fp32 gradients
    assert estimate.get("ddp").optimizer == 8 * trained  # AdamW's two fp32 moments
    zero2 = estimate.get("deepspeed_stage_2")  # the same, partitioned over the 2 ranks, and ZeRO's fp32 master copy
    assert (zero2.gradients, zero2.optimizer) == (4 * trained // 2, (4 + 8) * trained // 2)


def test_activation_checkpointing_lowers_the_activation_estimate():
    config = GPTConfig(n_layer=4, d_model=128, n_head=4, seq_len=128)
    plain = estimate_memory(GPTModule(config), batch_size=2)
    checkpointed = estimate_memory(GPTModule(config), batch_size=2, activation_checkpointing=True)
    assert 0 < checkpointed.activation_bytes < 0.3 * plain.activation_bytes


def test_recommendation():
    estimate = estimate_memory(
        GPTModule(GPTConfig(n_layer=2, d_model=64, n_head=2, seq_len=32)), devices=2, batch_size=4
    )
    assert estimate.recommend(80 * 2**30)[0] == "ddp"
    between = (estimate.get("ddp").device_total + estimate.get("fsdp").device_total) // 2
    assert estimate.recommend(int(between / 0.9))[0] == "fsdp"
    assert estimate.recommend(1)[0] == "fsdp_cpu_offload"


@pytest.mark.parametrize(
    "text, expected",
    [("80GiB", 80 * 2**30), ("1TiB", 2**40), ("512 MB", 512 * 10**6), ("1024", 1024), ("1.5gib", int(1.5 * 2**30))],
)
def test_memory_sizes(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["80 GB?", "lots", "12XB", ""])
def test_memory_size_that_does_not_parse(text):
    with pytest.raises(ConfigError, match="write it like 80GiB"):
        parse_memory_size(text)


def test_model_that_fails_on_meta_names_itself():
    class NeedsData(TrainModule):
        def configure_model(self):
            self.layer = nn.Linear(4, 4)
            self.scale = float(self.layer.weight.detach().sum())  # needs real values

    with pytest.raises(ConfigError, match="building NeedsData on the meta device failed"):
        estimate_memory(NeedsData())


def test_zero_devices():
    with pytest.raises(ConfigError, match="devices and num_nodes must be whole numbers >= 1"):
        estimate_memory(GPTModule(), devices=0)


def test_the_estimator_is_public():
    import shardtrain
    import shardtrain.estimate

    assert shardtrain.estimate_memory is shardtrain.estimate.estimate_memory
    assert shardtrain.MemoryEstimate is shardtrain.estimate.MemoryEstimate
    assert {"estimate_memory", "MemoryEstimate"} <= set(shardtrain.__all__)


def test_zero_rows_are_the_registered_deepspeed_strategies():
    from shardtrain import available_strategies

    estimate = estimate_memory(GPTModule(GPTConfig(n_layer=2, d_model=64, n_head=2, seq_len=32)), devices=2)
    deepspeed_names = {name for name in available_strategies() if name.startswith("deepspeed_stage_")}
    rows = {s.strategy: s for s in estimate.strategies}
    assert len(deepspeed_names) == 6 and deepspeed_names <= set(rows)
    assert all(rows[name].available for name in deepspeed_names)
    assert not [s.strategy for s in estimate.strategies if s.strategy.startswith("zero")]
    assert {s.strategy for s in estimate.strategies if s.available} == set(rows) & set(available_strategies())


def test_zero_rows_follow_where_deepspeed_keeps_the_bytes():
    from shardtrain.estimate.table import DEEPSPEED_REDUCE_BUCKET

    config = GPTConfig(n_layer=2, d_model=64, n_head=2, seq_len=32)
    n = config.num_parameters
    fp32 = estimate_memory(GPTModule(config), devices=4)
    bucket = 4 * DEEPSPEED_REDUCE_BUCKET
    # fp32: weights 4 bytes, the optimizer's fp32 master partition (4) and AdamW moments (8) over 4 ranks
    assert (fp32.get("deepspeed_stage_1").parameters, fp32.get("deepspeed_stage_1").gradients) == (4 * n, 4 * n)
    assert fp32.get("deepspeed_stage_1").optimizer == 12 * n // 4
    assert (fp32.get("deepspeed_stage_2").gradients, fp32.get("deepspeed_stage_2").working) == (4 * n // 4, bucket)
    zero3 = fp32.get("deepspeed_stage_3")
    assert (zero3.parameters, zero3.gradients, zero3.optimizer) == (4 * n // 4, 4 * n // 4, 12 * n // 4)
    assert zero3.working == 2 * fp32.largest_unit_bytes + bucket
    offload = fp32.get("deepspeed_stage_3_offload")
    assert offload.parameters + offload.gradients + offload.optimizer == 0
    assert offload.host_per_device == (4 * n + 8 * n + 4 * n + 4 * n) // 4  # master, moments, fp32 grads, weights
    assert fp32.get("deepspeed_stage_2_offload").parameters == 4 * n
    # bf16: DeepSpeed holds 16-bit weights and gradients; master and moments stay fp32
    bf16 = estimate_memory(GPTModule(config), devices=4, precision="bf16-mixed")
    zero2 = bf16.get("deepspeed_stage_2")
    assert (zero2.parameters, zero2.gradients, zero2.optimizer) == (2 * n, 2 * n // 4, 12 * n // 4)
    assert zero2.working == bf16.get("deepspeed_stage_1").working == 2 * DEEPSPEED_REDUCE_BUCKET  # a bf16 bucket


def test_auto_never_picks_a_deepspeed_row():
    estimate = estimate_memory(
        GPTModule(GPTConfig(n_layer=2, d_model=64, n_head=2, seq_len=32)), devices=2, batch_size=4
    )
    for memory in (80 * 2**30, estimate.get("fsdp").device_total, 1):
        assert not estimate.recommend(memory)[0].startswith("deepspeed")


def test_str_of_an_estimate_is_the_table():
    config = GPTConfig(n_layer=2, d_model=64, n_head=2, seq_len=32)
    unknown = str(estimate_memory(GPTModule(config), devices=2, batch_size=4))
    assert not unknown.startswith("MemoryEstimate(") and " fits" not in unknown.splitlines()[2]
    estimate = estimate_memory(GPTModule(config), devices=2, batch_size=4, device_memory="1GiB")
    text = str(estimate)
    assert text == estimate.table() and "not yet" not in text
    header, rows = text.splitlines()[2], {line.split()[0]: line.split() for line in text.splitlines()[3:] if line}
    assert header.split() == ["strategy", "params", "grads", "optim", "activ", "working", "device", "host/dev", "fits"]
    ddp = estimate.get("ddp")
    assert float(rows["ddp"][6]) == pytest.approx(ddp.device_total / 2**20, abs=0.01)  # MiB for a small model
    assert rows["ddp"][-1] == "yes"
    assert rows["deepspeed_stage_2"][-1] == "no"  # its 1.86 GiB fp32 reduce bucket alone is over 0.9 GiB
    assert "MiB per device" in text and "fits: within 90% of 1.00 GiB per device" in text


def test_a_namedtuple_batch_is_walked():
    from collections import namedtuple

    Batch = namedtuple("Batch", ["inputs", "targets"])

    class Regression(TrainModule):
        def configure_model(self):
            self.layer = nn.Linear(16, 1)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.layer(batch.inputs["x"]), batch.targets[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    batch = Batch(inputs={"x": torch.zeros(8, 16)}, targets=[torch.zeros(8, 1)])
    estimate = estimate_memory(Regression(), batch=batch)
    assert estimate.activation_bytes == 8 * 16 * 4 + 2 * 8 * 4  # the input (for the weight), prediction and target


def test_the_cli_prints_the_same_table(capsys):
    from shardtrain.cli import main
    from tests.distributed.runner import ROOT

    config = ROOT / "tests" / "distributed" / "configs" / "tiny.yaml"
    assert main(["estimate", "--config", str(config), "--device-memory", "1GiB", "--host-memory", "8GiB"]) == 0
    printed = capsys.readouterr().out
    estimate = estimate_memory(
        GPTModule(GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=32)),
        devices=2,
        batch_size=4,
        device_memory="1GiB",
        host_memory_per_device=4 * 2**30,
    )
    estimate.model = printed.split(":")[0]
    assert printed == f"{estimate}\nrecommended: {estimate.recommend(2**30, 4 * 2**30)[1]}\n"
    assert "fits: within 90% of 1.00 GiB per device, 4.00 GiB host memory per device" in printed


# Each strategy's memory formula lives beside it (Strategy.estimate_memory); the table asks every registered one.
SMALL = GPTConfig(n_layer=2, d_model=64, n_head=2, seq_len=32)


@pytest.fixture
def registered():
    """Register strategies for one test; afterwards the registry is as it was (no other test sees them)."""
    from shardtrain.strategies.registry import _REGISTRY, register_strategy

    saved = dict(_REGISTRY)

    def register(name, factory):
        register_strategy(name, factory, "registered by a test", override=True)

    yield register
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_the_rows_are_in_the_order_of_the_table():
    pytest.importorskip("deepspeed", reason="the deepspeed_stage_* rows need the extra")
    zero = ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3"]
    zero += ["deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme"]  # "deepspeed" is stage 2: no row of its own
    fsdp = ["fsdp", "fsdp_shard_grad_op", "fsdp_hybrid", "fsdp_cpu_offload"]
    for devices, whole, split in ((1, "single", []), (2, "ddp", ["model_parallel"])):  # tp=2: the GPT's own plan
        estimate = estimate_memory(GPTModule(SMALL), devices=devices)
        assert [s.strategy for s in estimate.strategies] == [whole, *fsdp, *split, *zero]
        assert [s.strategy for s in estimate.strategies if not s.available] == ["fsdp_shard_grad_op", "fsdp_hybrid"]


def test_a_registered_strategy_with_a_formula_gets_a_row(registered):
    from shardtrain import SingleDeviceStrategy
    from shardtrain.memory import StrategyMemory

    class Halves(SingleDeviceStrategy):
        """A toy: half the parameters per device, plus a fixed buffer."""

        def estimate_memory(self, footprint):
            return StrategyMemory(
                strategy="a label the table replaces",
                parameters=footprint.parameter_bytes // 2,
                gradients=0,
                optimizer=0,
                activations=footprint.activation_bytes,
                working=12345,
            )

    built_in = [s.strategy for s in estimate_memory(GPTModule(SMALL), devices=2).strategies]
    registered("toy_halves", Halves)
    estimate = estimate_memory(GPTModule(SMALL), devices=2, device_memory="1GiB")
    row = estimate.get("toy_halves")
    assert row.strategy == "toy_halves" and row.available  # named as registered, and selectable
    assert (row.parameters, row.working) == (estimate.parameter_bytes // 2, 12345)
    assert [s.strategy for s in estimate.strategies] == [*built_in, "toy_halves"]  # after the built-ins
    assert any(line.split()[0] == "toy_halves" for line in str(estimate).splitlines()[3:] if line)
    assert estimate.recommend(80 * 2**30)[0] == "ddp"  # auto still chooses among ddp and fsdp only


def test_a_strategy_without_a_formula_is_left_out(registered):
    from shardtrain import SingleDeviceStrategy, Strategy

    class NoFormula(SingleDeviceStrategy):
        estimate_memory = Strategy.estimate_memory  # the default: None, no formula

    class NotForThisLayout(SingleDeviceStrategy):
        def estimate_memory(self, footprint):
            return None if footprint.world_size > 1 else super().estimate_memory(footprint)

    registered("toy_no_formula", NoFormula)
    registered("toy_one_device", NotForThisLayout)
    two = {s.strategy for s in estimate_memory(GPTModule(SMALL), devices=2).strategies}
    assert "toy_no_formula" not in two and "toy_one_device" not in two and {"ddp", "fsdp"} <= two
    one = {s.strategy for s in estimate_memory(GPTModule(SMALL)).strategies}
    assert "toy_no_formula" not in one and "toy_one_device" in one


def test_each_row_is_its_strategys_own_formula():
    from shardtrain import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
    from shardtrain.estimate.footprint import measure_footprint

    estimate = estimate_memory(GPTModule(SMALL), devices=4, num_nodes=2, batch_size=2)
    footprint = measure_footprint(GPTModule(SMALL), devices=4, num_nodes=2, batch_size=2)
    assert footprint.world_size == 8 and footprint.parameter_bytes == estimate.parameter_bytes

    def row(strategy, name):
        return replace(strategy.estimate_memory(footprint), strategy=name)

    assert row(DDPStrategy(), "ddp") == estimate.get("ddp")
    assert SingleDeviceStrategy().estimate_memory(footprint) is None  # 8 ranks: no single-device row
    assert row(FSDPStrategy(cpu_offload=True), "fsdp_cpu_offload") == estimate.get("fsdp_cpu_offload")
    hybrid = replace(estimate.get("fsdp_hybrid"), available=True)
    assert row(FSDPStrategy(sharding_strategy="HYBRID_SHARD"), "fsdp_hybrid") == hybrid  # a node's 4 devices
    two_by_four = FSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(4, 2)).estimate_memory(footprint)
    assert two_by_four.parameters == footprint.parameter_bytes // 2  # the mesh's shard size, not the node's
    no_shard = FSDPStrategy(sharding_strategy="NO_SHARD").estimate_memory(footprint)
    assert replace(no_shard, strategy="ddp") == estimate.get("ddp")  # replicated, like DDP


def test_deepspeed_rows_come_from_the_strategys_config():
    pytest.importorskip("deepspeed", reason="install the extra: pip install 'shardtrain[deepspeed]'")
    from shardtrain import DeepSpeedStrategy
    from shardtrain.estimate.footprint import measure_footprint

    estimate = estimate_memory(GPTModule(SMALL), devices=4)
    footprint = measure_footprint(GPTModule(SMALL), devices=4)
    stage_3 = DeepSpeedStrategy(config={"zero_optimization": {"stage": 3}}).estimate_memory(footprint)
    assert replace(stage_3, strategy="deepspeed_stage_3") == estimate.get("deepspeed_stage_3")
    smaller = DeepSpeedStrategy(stage=2, reduce_bucket_size=1000).estimate_memory(footprint)
    assert smaller.working == 4 * 1000  # the config's reduce bucket, in fp32
    assert DeepSpeedStrategy(stage=0).estimate_memory(footprint) is None  # no formula: no row, not a guess


def test_one_memory_size_parser():
    import shardtrain.cli
    import shardtrain.estimate.table
    import shardtrain.memory

    assert shardtrain.estimate.table.parse_memory_size is shardtrain.memory.parse_memory_size
    assert shardtrain.cli.parse_memory_size is shardtrain.memory.parse_memory_size  # consolidate --max-shard-size
    assert shardtrain.estimate.table.StrategyMemory is shardtrain.memory.StrategyMemory


# strategy="auto" walks the registered candidates (register_strategy(..., auto_priority=N)), lowest N first.
def _replica_with_buffer():
    """A toy plug-in: DDP that keeps a fixed 1 GiB buffer per device (its own formula)."""
    from shardtrain import DDPStrategy

    class ReplicaWithBuffer(DDPStrategy):
        def estimate_memory(self, footprint):
            row = super().estimate_memory(footprint)
            return None if row is None else replace(row, working=row.working + 2**30)

    return ReplicaWithBuffer


def test_auto_picks_a_plugin_ahead_of_the_builtins_while_it_fits(registered):
    from shardtrain.strategies.registry import auto_candidates, register_strategy

    built_in = estimate_memory(GPTModule(SMALL), devices=2, batch_size=4)
    ddp, fsdp = built_in.get("ddp").device_total, built_in.get("fsdp").device_total
    assert auto_candidates() == ["single", "ddp", "fsdp", "model_parallel", "fsdp_cpu_offload"]
    register_strategy("toy_buffered", _replica_with_buffer(), "registered by a test", auto_priority=50)
    assert auto_candidates()[0] == "toy_buffered"
    estimate = estimate_memory(GPTModule(SMALL), devices=2, batch_size=4)
    toy = estimate.get("toy_buffered").device_total
    assert toy == ddp + 2**30
    name, reason = estimate.recommend(int(toy / 0.9) + 1)
    assert name == "toy_buffered" and reason.startswith(f"toy_buffered: needs {toy / 2**30:.2f} GiB per device")
    # It does not fit: the built-ins, in their order and with their messages, as before.
    for memory in (int(toy / 0.9) - 1, 80 * 2**20, int((ddp + fsdp) / 2 / 0.9), 1):
        assert estimate.recommend(memory) == built_in.recommend(memory)
    assert estimate.recommend(int(toy / 0.9) - 1)[0] == "ddp"
    assert estimate.recommend(int((ddp + fsdp) / 2 / 0.9))[0] == "fsdp"
    assert estimate.recommend(1) == (
        "fsdp_cpu_offload",
        "nothing fits in 0.00 GiB per device; fsdp_cpu_offload needs the least device memory",
    )


def test_auto_tries_a_plugin_in_its_place_among_the_builtins(registered):
    from shardtrain import FSDPStrategy
    from shardtrain.strategies.registry import register_strategy

    class HalfActivations(FSDPStrategy):
        """A toy: FSDP that (it says) keeps half the activations."""

        def estimate_memory(self, footprint):
            row = super().estimate_memory(footprint)
            return replace(row, activations=row.activations // 2)

    register_strategy("toy_lean", HalfActivations, "registered by a test", auto_priority=150)  # after ddp, before fsdp
    estimate = estimate_memory(GPTModule(SMALL), devices=2, batch_size=4)
    ddp, lean = estimate.get("ddp").device_total, estimate.get("toy_lean").device_total
    assert lean < estimate.get("fsdp").device_total < ddp
    assert estimate.recommend(int(ddp / 0.9) + 1)[0] == "ddp"  # ahead of it: ddp still wins while it fits
    assert estimate.recommend(int(lean / 0.9) + 1)[0] == "toy_lean"  # fsdp would fit too: the plug-in is tried first
    assert estimate.recommend(1)[0] == "fsdp_cpu_offload"  # nothing fits: the last candidate


def test_auto_skips_a_candidate_without_a_row_for_the_layout(registered):
    from shardtrain.strategies.registry import register_strategy

    def one_device_only():  # a factory, not a class: its formula can only be asked when auto runs
        from shardtrain import SingleDeviceStrategy

        return SingleDeviceStrategy()

    register_strategy("toy_single", one_device_only, "registered by a test", auto_priority=1)
    estimate = estimate_memory(GPTModule(SMALL), devices=2, batch_size=4)
    assert "toy_single" not in {s.strategy for s in estimate.strategies}  # one device's formula, two devices here
    assert estimate.recommend(80 * 2**30)[0] == "ddp"
    assert estimate_memory(GPTModule(SMALL), batch_size=4).recommend(80 * 2**30)[0] == "toy_single"
