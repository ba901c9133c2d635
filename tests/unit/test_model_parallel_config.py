"""``strategy="model_parallel"``: sizes, plans and head counts checked before any process group exists."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.gpt.model import GPT, GPTConfig, GPTModule
from shardtrain import ModelParallelStrategy, Trainer
from shardtrain.errors import ConfigError, StrategyError
from shardtrain.strategies import create_strategy
from shardtrain.parallel.tensor_parallel.plan import check_plan, matching_modules


@pytest.mark.parametrize(
    "options, world, local, expected",
    [
        ({}, 4, 2, (2, 2)),  # Lightning's auto: one node's processes split each layer, nodes hold data
        ({"tensor_parallel_size": 2}, 8, 8, (4, 2)),
        ({"data_parallel_size": 2}, 8, 8, (2, 4)),
        ({"data_parallel_size": 1, "tensor_parallel_size": 4}, 4, 4, (1, 4)),
    ],
)
def test_sizes_and_auto(options, world, local, expected) -> None:
    dims = ModelParallelStrategy(**options).make_parallel_dims(world, local)
    assert (dims.data_parallel_size, dims.tp) == expected
    assert dims.mesh_dims() == {
        "dp_replicate": 1,
        "dp_shard": expected[0],
        **({"tp": expected[1]} if expected[1] > 1 else {}),
    }


def test_a_tensor_parallel_size_that_does_not_divide_the_run_is_refused_before_any_process() -> None:
    with pytest.raises(StrategyError, match=r"tensor_parallel_size=2 does not divide the 3 ranks of the run"):
        Trainer(accelerator="cpu", devices=3, strategy=ModelParallelStrategy(tensor_parallel_size=2))
    with pytest.raises(StrategyError, match=r"data_parallel_size=3 x tensor_parallel_size=2 = 6, but the run has 4"):
        ModelParallelStrategy(data_parallel_size=3, tensor_parallel_size=2).make_parallel_dims(4, 4)
    with pytest.raises(StrategyError, match=r"tensor_parallel_size must be a whole number >= 1 or 'auto', got 0"):
        ModelParallelStrategy(tensor_parallel_size=0)


@pytest.mark.parametrize(
    "style, message",
    [
        ("diagonal", r"unknown tensor-parallel style 'diagonal'; choose one of colwise, rowwise"),
        (
            "packed_colwise",
            r"'packed_colwise' \(fused gate/up projections .*\) is a transformers style shardtrain does not",
        ),
    ],
)
def test_a_style_name_that_is_not_known_is_refused_when_the_strategy_is_made(style, message) -> None:
    with pytest.raises(ConfigError, match=message):
        create_strategy("model_parallel", tp_plan={"model.blocks.*.attn.qkv": style})


def test_plan_patterns_match_one_part_per_star() -> None:
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=3, n_head=2, d_model=16, seq_len=8))
    assert [name for name, _ in matching_modules(model, "blocks.*.attn.qkv")] == [
        f"blocks.{i}.attn.qkv" for i in range(3)
    ]
    assert matching_modules(model, "blocks.*.qkv") == []  # '*' is one part of a name, never two
    assert [name for name, _ in matching_modules(model, "blocks.[02].mlp.up")] == ["blocks.0.mlp.up", "blocks.2.mlp.up"]
    with pytest.raises(ConfigError, match="not a module-name pattern"):
        check_plan({"blocks..qkv": "colwise"})


def _fit(strategy: ModelParallelStrategy, config: GPTConfig) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, enable_progress_bar=False)
    tokens = torch.zeros(4, config.seq_len, dtype=torch.long)
    trainer.fit(GPTModule(config), DataLoader(TensorDataset(tokens, tokens), batch_size=2))
    return trainer


def test_heads_that_do_not_divide_by_the_tensor_parallel_size_are_refused_before_any_process_group() -> None:
    strategy = ModelParallelStrategy(tensor_parallel_size=2)
    with pytest.raises(
        ConfigError, match=r"GPTConfig.n_head = 3 is not divisible by tensor_parallel_size=2: .* \(1, 3\)"
    ):
        _fit(strategy, GPTConfig(n_layer=1, n_head=3, d_model=24, seq_len=8))
    assert strategy.environment is None, "no process was launched"


def test_a_plan_entry_that_matches_no_module_is_refused_before_any_process_group() -> None:
    strategy = ModelParallelStrategy(tensor_parallel_size=2, tp_plan={"model.layers.*.attention.wq": "colwise"})
    with pytest.raises(
        ConfigError, match=r"'model.layers.\*.attention.wq' .* matches no module of GPTModule; .* model.blocks"
    ):
        _fit(strategy, GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8))
    assert strategy.environment is None


def test_loss_parallel_without_a_gathering_output_layer_is_refused_before_any_process_group() -> None:
    plan = {"model.blocks.*.mlp.up": "colwise", "model.blocks.*.mlp.down": "rowwise"}
    strategy = ModelParallelStrategy(tensor_parallel_size=2, tp_plan=plan, loss_parallel=True)
    with pytest.raises(ConfigError, match=r"loss_parallel needs the output layer .* found 0: none. Give the output"):
        _fit(strategy, GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8))
    assert strategy.environment is None


def test_a_split_style_on_a_block_is_refused_before_any_process_group() -> None:
    strategy = ModelParallelStrategy(tensor_parallel_size=2, tp_plan={"model.blocks.*.mlp": "colwise"})
    with pytest.raises(ConfigError, match=r"'model.blocks.0.mlp', a MLP, the style ColwiseParallel, which splits only"):
        _fit(strategy, GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8))
    assert strategy.environment is None


def test_two_plan_entries_for_one_module_are_refused() -> None:
    plan = {"model.blocks.*.attn.qkv": "colwise", "model.blocks.0.attn.qkv": "rowwise"}
    with pytest.raises(ConfigError, match=r"'model.blocks.0.attn.qkv' is named by two tensor-parallel plan entries"):
        _fit(
            ModelParallelStrategy(tensor_parallel_size=2, tp_plan=plan),
            GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8),
        )


def test_a_model_without_a_plan_is_refused_naming_the_three_ways_to_give_one() -> None:
    class NoPlan(GPTModule):
        def configure_model(self) -> None:
            super().configure_model()
            self.model.tp_plan = {}

    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(tensor_parallel_size=2), enable_progress_bar=False
    )
    tokens = torch.zeros(4, 8, dtype=torch.long)
    with pytest.raises(
        StrategyError, match=r"has no tensor-parallel plan: pass tp_plan=.*tp_plan attribute.*configure_model"
    ):
        trainer.fit(
            NoPlan(GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8)), DataLoader(TensorDataset(tokens, tokens))
        )


def test_the_sequence_parallel_style_names_are_pytorchs_styles_with_these_layouts() -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    from shardtrain.parallel.tensor_parallel.plan import make_style, sequence_splits

    split, gather = make_style("split_sequence", "t"), make_style("gather_sequence", "t")
    assert isinstance(split, PrepareModuleInput) and isinstance(gather, PrepareModuleInput)
    assert (split.input_layouts, split.desired_input_layouts) == ((Replicate(),), (Shard(1),))
    assert (gather.input_layouts, gather.desired_input_layouts) == ((Shard(1),), (Replicate(),))
    rowwise, head = make_style("rowwise_sequence", "t"), make_style("colwise_rep_sequence", "t")
    assert isinstance(rowwise, RowwiseParallel) and rowwise.output_layouts == (Shard(1),)
    assert isinstance(head, ColwiseParallel) and (head.input_layouts, head.output_layouts) == (
        (Shard(1),),
        (Replicate(),),
    )
    # What the uneven-length check watches: the whole inputs a style cuts.
    assert sequence_splits(split) == [(0, 1)] and sequence_splits(rowwise) == [(0, 1)]
    assert sequence_splits(gather) == [] and sequence_splits(make_style("rowwise", "t")) == []


def test_sequence_parallel_reads_the_models_own_sequence_parallel_plan() -> None:
    from shardtrain.parallel.tensor_parallel.plan import find_plan

    module = GPTModule(GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8))
    module.configure_model()
    found = find_plan(module, None, sequence_parallel=True)
    assert found.source == "GPT.sequence_parallel_tp_plan" and found.patterns == GPT.sequence_parallel_tp_plan
    assert find_plan(module, None).source == "GPT.tp_plan"


def test_sequence_parallel_with_an_own_plan_is_refused_naming_the_styles() -> None:
    with pytest.raises(StrategyError, match=r"with your own tp_plan, write the sequence-parallel styles into it"):
        ModelParallelStrategy(sequence_parallel=True, tp_plan={"model.blocks.*.mlp.up": "colwise"})


def test_sequence_parallel_on_a_model_without_a_sequence_parallel_plan_is_refused_before_any_process_group() -> None:
    class PlainPlanOnly(GPTModule):
        def configure_model(self) -> None:
            super().configure_model()
            self.model.sequence_parallel_tp_plan = {}

    strategy = ModelParallelStrategy(tensor_parallel_size=2, sequence_parallel=True)
    tokens = torch.zeros(4, 8, dtype=torch.long)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, enable_progress_bar=False)
    with pytest.raises(StrategyError, match=r"sequence_parallel=True but PlainPlanOnly has no sequence-parallel plan"):
        trainer.fit(
            PlainPlanOnly(GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8)),
            DataLoader(TensorDataset(tokens, tokens)),
        )
    assert strategy.environment is None


def test_loss_parallel_keeps_a_sequence_parallel_output_layers_split_input() -> None:
    from torch.distributed.tensor import Shard

    from shardtrain.parallel.tensor_parallel.plan import FoundPlan, with_split_logits

    module = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8))
    head = with_split_logits(FoundPlan(module, dict(GPT.sequence_parallel_tp_plan), "t")).patterns["head"]
    assert head.input_layouts == (Shard(1),) and head.output_layouts == (Shard(-1),) and not head.use_local_output
