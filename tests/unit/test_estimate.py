"""The memory estimator: exact counts from the meta device, nothing allocated, clear errors."""

import resource

import pytest
import torch
from torch import nn

from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import ConfigError, TrainModule
from shardtrain.estimate import estimate_memory, parse_memory_size


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
