"""FSDP options are checked before any process starts, with errors that name the fix."""

import pytest
import torch
from torch import nn

from shardtrain import ConfigError, FSDPStrategy, StrategyError, Trainer
from shardtrain.parallel.policy import policy_matcher, repeated_blocks, select_modules


def test_lightning_names_and_enum_are_accepted():
    from torch.distributed.fsdp import ShardingStrategy

    assert FSDPStrategy(sharding_strategy="shard_grad_op").sharding_strategy == "SHARD_GRAD_OP"
    assert FSDPStrategy(sharding_strategy=ShardingStrategy.HYBRID_SHARD).sharding_strategy == "HYBRID_SHARD"
    assert Trainer(accelerator="cpu", strategy="fsdp_cpu_offload").strategy.cpu_offload is True


def test_unknown_sharding_strategy():
    with pytest.raises(StrategyError, match="unknown sharding_strategy 'ZERO4'.*FULL_SHARD"):
        FSDPStrategy(sharding_strategy="ZERO4")


def test_hybrid_mesh_must_cover_the_world():
    with pytest.raises(
        StrategyError, match=r"device_mesh \(2, 3\) has 6 ranks but the run has 4.*replicate \* shard = 4"
    ):
        Trainer(
            accelerator="cpu", devices=4, strategy=FSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 3))
        )


def test_mesh_only_with_hybrid():
    with pytest.raises(StrategyError, match="device_mesh is for sharding_strategy='HYBRID_SHARD'"):
        FSDPStrategy(device_mesh=(1, 2))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 2)
        self.small = nn.ModuleList([nn.Linear(1, 1)])
        self.blocks = nn.ModuleList([Block(), Block()])


def test_policy_that_matches_nothing_lists_the_classes():
    with pytest.raises(
        ConfigError, match="matches no module of Net; its module classes are: Block, Linear, ModuleList, Net"
    ):
        select_modules(Net(), {"TransformerBlock"}, "auto_wrap_policy")


def test_policy_forms():
    net = Net()
    assert select_modules(net, {Block}, "p") == list(net.blocks)
    assert select_modules(net, {"Block"}, "p") == list(net.blocks)
    assert select_modules(net, lambda m: m is net.embed, "p") == [net.embed]
    with pytest.raises(ConfigError, match="module classes or class names"):
        policy_matcher({3}, "auto_wrap_policy")


def test_default_wrap_is_the_largest_module_list():
    net = Net()
    assert repeated_blocks(net) == list(net.blocks)


def test_materialize_keeps_tied_weights_tied():
    from shardtrain.parallel.materialize import materialize

    with torch.device("meta"):
        embed = nn.Embedding(10, 4)
        head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    materialize(model, torch.device("cpu"))
    assert model["head"].weight is model["embed"].weight
    assert not model["embed"].weight.is_meta
