"""Delayed initialisation refuses to leave tensors uninitialised, and initialises Hugging Face models their way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardtrain.errors import ConfigError
from shardtrain.parallel.materialize import materialize


class Scale(nn.Module):
    """A parameter made in __init__ (ones) and no reset_parameters(): on the meta device nothing would set it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


def test_a_module_that_nothing_would_initialise_is_refused_naming_it() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(
        ConfigError, match=r"Scale \(1\) was built on the meta device but neither it nor a module above"
    ):
        materialize(model, torch.device("cpu"))


def test_a_reset_parameters_above_covers_the_modules_below() -> None:
    class Covered(nn.Sequential):
        def reset_parameters(self) -> None:
            nn.init.constant_(self[1].weight, 2.0)

    with torch.device("meta"):
        model = Covered(nn.Linear(4, 4), Scale())
    materialize(model, torch.device("cpu"))
    assert torch.equal(model[1].weight, torch.full((4,), 2.0))


def test_a_hugging_face_model_gets_its_own_initialisation() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    eager = LlamaForCausalLM(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    materialize(model, torch.device("cpu"))
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))  # RMSNorm has no reset_parameters: transformers' init sets it
    rotary = model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, eager.model.rotary_emb.inv_freq)  # a buffer computed in __init__
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.4 < std < 0.6  # the config's initializer_range, not nn.Linear's default (about 0.1 here)
