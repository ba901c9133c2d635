"""Expert parallelism without processes: which layers it recognises, the layouts it accepts and refuses, and the
GPT example's mixture of experts (its balance loss, its parameter count). The numbers over real ranks are in
``tests/distributed/test_expert_parallel.py``."""

import pytest
import torch
from torch import nn

from examples.gpt.model import GPT, GPTConfig
from examples.gpt.moe import Experts, MoE, sequence_balance_loss
from shardtrain import ModelParallelStrategy
from shardtrain.errors import ConfigError, StrategyError
from shardtrain.parallel.dims import ParallelDims
from shardtrain.parallel.expert_parallel import check_expert_parallel, find_experts, is_experts
from shardtrain.strategies.model_parallel import model_parallel_dims


def test_the_gpt_examples_and_mixtrals_experts_are_recognised_and_their_routers_are_not():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=64,
    )  # fmt: skip
    with torch.device("meta"):
        mixtral = transformers.MixtralForCausalLM(config)
        gpt = GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, n_experts=4))
    assert [name for name, _ in find_experts(mixtral)] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert [name for name, _ in find_experts(gpt)] == [f"blocks.{i}.mlp.experts" for i in range(2)]
    assert not is_experts(mixtral.model.layers[0].mlp.gate)  # num_experts and [experts, d] weights, one input
    assert not is_experts(nn.Linear(4, 4))


def test_a_dense_model_or_experts_the_degree_does_not_divide_are_refused_naming_the_fix():
    with torch.device("meta"):
        dense = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32))
        three = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, n_experts=3, top_k=1))
    with pytest.raises(ConfigError, match="has no mixture-of-experts layer .* leave expert_parallel_size at 1"):
        check_expert_parallel(dense, 2)
    with pytest.raises(ConfigError, match="has 3 experts, which expert_parallel_size=2 does not divide"):
        check_expert_parallel(three, 2)
    assert len(check_expert_parallel(three, 3)) == 1


def test_expert_parallel_ranks_are_borrowed_from_data_parallel_ones():
    assert model_parallel_dims(4, 4, dp="auto", tp="auto", pp=1, cpu_offload=False, ep=2) == ParallelDims(
        world_size=4, dp_shard=4, ep=2
    )  # named alone: the ranks stay data parallel (tensor parallelism is not chosen for it)
    dims = model_parallel_dims(4, 4, dp="auto", tp=2, pp=1, cpu_offload=False, ep=2)
    assert (dims.dp_shard, dims.tp, dims.ep) == (2, 2, 2)
    with pytest.raises(ConfigError, match="expert_parallel_size=4 does not divide the 2 data-parallel ranks"):
        model_parallel_dims(4, 4, dp="auto", tp=2, pp=1, cpu_offload=False, ep=4)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"expert_parallel_size": 0}, "expert_parallel_size must be a whole number >= 1"),
        ({"expert_parallel_size": 2, "pipeline_parallel_size": 2}, "with pipeline_parallel_size > 1 is not supported"),
        ({"expert_parallel_size": 2, "context_parallel_size": 2}, "with context_parallel_size > 1 is not supported"),
    ],
)
def test_layouts_expert_parallelism_does_not_compose_with_yet_are_refused(options, message):
    with pytest.raises(StrategyError, match=message):
        ModelParallelStrategy(**options)


def test_the_balance_loss_is_one_when_even_and_a_mean_over_sequences():
    # 2 sequences of 4 tokens, 4 experts, top 1: each sequence sends one token to each expert, with equal probability.
    even = torch.full((2, 4, 4), 0.25)
    index = torch.arange(4).repeat(2, 1)[..., None]
    assert sequence_balance_loss(even, index).item() == pytest.approx(1.0)
    # All tokens to expert 0, which the router favours: the loss grows.
    favoured = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(2, 4, 4)
    assert sequence_balance_loss(favoured, torch.zeros(2, 4, 1, dtype=torch.long)).item() == pytest.approx(2.8)
    # A mean over sequences: the whole batch's loss is the mean of its halves' (so data parallelism keeps it).
    probs = torch.softmax(torch.randn(4, 6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    top = probs.topk(2, dim=-1).indices
    halves = (sequence_balance_loss(probs[:2], top[:2]) + sequence_balance_loss(probs[2:], top[2:])) / 2
    assert sequence_balance_loss(probs, top).item() == pytest.approx(halves.item())


def test_experts_compute_each_tokens_weighted_sum_of_its_experts():
    torch.manual_seed(0)
    experts = Experts(num_experts=3, d_model=4, hidden=8, n_layer=1)
    experts.reset_parameters()
    tokens = torch.randn(5, 4)
    index = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    weights = torch.rand(5, 2)
    expected = torch.stack(
        [
            sum(w * (torch.nn.functional.gelu(t @ experts.up[e].T) @ experts.down[e].T) for e, w in zip(i, ws))
            for t, i, ws in zip(tokens, index, weights)
        ]
    )
    torch.testing.assert_close(experts(tokens, index, weights), expected)


@pytest.mark.parametrize("shared", [False, True])
def test_the_configs_parameter_count_is_the_models(shared):
    config = GPTConfig(n_layer=2, n_head=2, d_model=32, n_experts=4, top_k=2, shared_expert=shared)
    with torch.device("meta"):
        model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters
    assert isinstance(model.blocks[0].mlp, MoE)
    # A token goes through 2 of the 4 experts' MLPs (8 d² each) per layer.
    assert config.num_parameters - config.active_parameters == 2 * 2 * 8 * 32 * 32
