"""Context parallelism's checks before any process group, its contract's refusals, and the pin on the CPU glue."""

import inspect

import pytest
import torch
from torch import nn

import shardtrain
from shardtrain import ModelParallelStrategy, Trainer
from shardtrain.errors import ConfigError, StrategyError
from shardtrain.parallel.context_parallel import sequence_inputs
from shardtrain.strategies.model_parallel import model_parallel_dims


class Plain(shardtrain.TrainModule):  # no context_parallel_inputs
    def configure_model(self):
        self.layer = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WithContract(Plain):
    def context_parallel_inputs(self, batch):
        return self.named(batch)


def test_a_module_without_the_contract_is_refused_before_any_process_starts():
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(context_parallel_size=2), logger=False
    )
    with pytest.raises(ConfigError, match=r"Plain does not say which batch tensors run along it: define "):
        trainer.fit(Plain(), torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=2))
    assert not torch.distributed.is_initialized()


def test_layouts_with_context_parallelism():
    dims = model_parallel_dims(4, 4, dp="auto", tp="auto", pp=1, cpu_offload=False, cp=2)
    assert (dims.dp_shard, dims.cp, dims.tp, dims.pp) == (2, 2, 1, 1)  # "auto" tensor parallelism: none beside cp
    assert model_parallel_dims(2, 2, dp="auto", tp="auto", pp=1, cpu_offload=True, cp=2).cp == 2  # FSDP over cp
    with pytest.raises(StrategyError, match=r"context_parallel_size=3 does not divide the 4 ranks"):
        model_parallel_dims(4, 4, dp="auto", tp="auto", pp=1, cpu_offload=False, cp=3)
    dims = model_parallel_dims(8, 8, dp="auto", tp=2, pp=1, cpu_offload=False, cp=2)
    assert (dims.dp_shard, dims.cp, dims.tp) == (2, 2, 2)  # with tensor parallelism: data x context x tensor
    assert list(dims.mesh_dims()) == ["dp_replicate", "dp_shard", "cp", "tp"]  # tensor parallel innermost
    with pytest.raises(StrategyError, match=r"tensor_parallel_size=3 does not divide the 2 ranks of the run"):
        model_parallel_dims(4, 4, dp="auto", tp=3, pp=1, cpu_offload=False, cp=2)
    dims = model_parallel_dims(8, 8, dp="auto", tp="auto", pp=2, cpu_offload=False, cp=2)
    assert (dims.pp, dims.dp_shard, dims.cp, dims.tp) == (2, 2, 2, 1)  # with pipeline stages: each stage's ranks
    with pytest.raises(StrategyError, match=r"context_parallel_size=4 does not divide the 6 ranks"):
        model_parallel_dims(6, 6, dp="auto", tp="auto", pp=2, cpu_offload=False, cp=4)
    with pytest.raises(StrategyError, match=r"context_parallel_size must be a whole number >= 1"):
        ModelParallelStrategy(context_parallel_size=0)


def test_the_contracts_answers_are_checked():
    module = WithContract()
    tokens = torch.zeros(2, 32, dtype=torch.long)
    module.named = lambda batch: [(tokens, 1), (tokens.clone(), 1)]
    assert len(sequence_inputs(module, None, 2)) == 2
    module.named = lambda batch: [(torch.zeros(2, 30), 1)]
    with pytest.raises(ConfigError, match=r"a sequence of 30 does not split into 2 x context_parallel_size = 4"):
        sequence_inputs(module, None, 2)
    module.named = lambda batch: [(tokens, 1), (torch.zeros(2, 16), 1)]
    with pytest.raises(ConfigError, match=r"sequences of different lengths \[16, 32\]"):
        sequence_inputs(module, None, 2)
    module.named = lambda batch: [tokens]
    with pytest.raises(ConfigError, match=r"must return a non-empty list of \(tensor, sequence dim\) pairs"):
        sequence_inputs(module, None, 2)


def test_positions_outside_a_context_parallel_step_are_the_whole_sequence():
    assert torch.equal(shardtrain.sequence_positions(5), torch.arange(5))


def test_pytorch_still_lacks_ring_attention_for_the_cpu_kernel():
    """The CPU glue (``_CPU_RING_ATTENTION``) exists because PyTorch's context parallelism dispatches only the CUDA
    attention kernels. When this fails, PyTorch handles CPU: delete the glue and this test."""
    from torch.distributed.tensor.experimental._context_parallel import _attention

    assert "_scaled_dot_product_flash_attention_for_cpu" not in inspect.getsource(_attention)


def test_the_estimate_has_a_context_parallel_row_with_each_ranks_part_of_the_activations():
    from examples.gpt.model import GPTConfig, GPTModule

    module = GPTModule(GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=256))
    estimate = shardtrain.estimate_memory(module, devices=4, batch_size=2, context_parallel_size=4)
    fsdp, context = estimate.get("fsdp"), estimate.get("context_parallel")
    assert (context.parameters, context.gradients, context.optimizer) == (
        fsdp.parameters,
        fsdp.gradients,
        fsdp.optimizer,
    )
    assert context.activations == fsdp.activations // 4 > 0
    assert "context_parallel *" in str(estimate) and "model_parallel's context_parallel_size" in str(estimate)
    with pytest.raises(ConfigError, match=r"context_parallel_size=3 does not divide the 4 ranks"):
        shardtrain.estimate_memory(module, devices=4, context_parallel_size=3)


def test_the_context_parallel_row_with_tensor_parallelism_splits_one_tensor_parallel_ranks_share():
    from examples.gpt.model import GPTConfig, GPTModule

    module = GPTModule(GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=256))
    both = shardtrain.estimate_memory(module, devices=4, batch_size=2, tensor_parallel_size=2, context_parallel_size=2)
    tensor, context = both.get("model_parallel"), both.get("context_parallel")  # tp 2 x dp 2; tp 2 x cp 2
    assert (context.parameters, context.gradients, context.optimizer) == (
        tensor.parameters,
        tensor.gradients,
        tensor.optimizer,
    )  # the same share, sharded over 2 ranks either way
    assert context.activations == tensor.activations // 2 > 0
    with pytest.raises(ConfigError, match=r"context_parallel_size=2 x tensor_parallel_size=2 does not divide the 2"):
        shardtrain.estimate_memory(module, devices=2, tensor_parallel_size=2, context_parallel_size=2)


def test_causal_lm_refuses_padded_batches_under_context_parallelism():
    from shardtrain.hf import CausalLM

    tokens = torch.zeros(2, 8, dtype=torch.long)
    batch = {"input_ids": tokens, "labels": tokens, "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])}
    with pytest.raises(ConfigError, match=r"without a padding mask, and this batch pads: pack the sequences"):
        CausalLM("unused").context_parallel_inputs(batch)
