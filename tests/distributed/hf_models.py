"""Small Hugging Face checkpoints made locally (no hub), and the token batches the tests train on."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB, SEQ_LEN = 256, 32
PIPELINE = '{"pipeline_parallel_size": 2, "microbatches": 2}'
#: ``scripts/finetune_hf.py`` arguments per layout; 4 sequences a step in each (2 per rank where data is split).
FINETUNE_LAYOUTS = {
    "single": ("--strategy", "single", "--devices", "1", "--batch-size", "4"),
    "ddp2": ("--strategy", "ddp", "--devices", "2", "--batch-size", "2"),
    "fsdp2": ("--strategy", "fsdp", "--devices", "2", "--batch-size", "2"),
    "zero3": ("--strategy", "deepspeed", "--strategy-options", '{"stage": 3}', "--devices", "2", "--batch-size", "2"),
    "tp2": ("--strategy", "model_parallel", "--devices", "2", "--batch-size", "4"),
    "pp2": ("--strategy", "model_parallel", "--strategy-options", PIPELINE, "--devices", "2", "--batch-size", "4"),
}


def save_llama(directory: Path, *, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "200KB") -> Path:
    """A 2-layer Llama saved in bf16 over several files with an index (as large checkpoints are)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
    )
    _pretrained(LlamaForCausalLM(config)).to(dtype).save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def save_mixtral(directory: Path) -> Path:
    """A 2-layer Mixtral (4 experts per layer, 2 per token), one fp32 file: transformers' MoE experts layout."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(2)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    _pretrained(MixtralForCausalLM(config)).save_pretrained(directory)
    return directory


def save_gpt2(directory: Path) -> Path:
    """A 2-layer GPT-2 (Conv1D layers, output layer tied to the embedding), one fp32 file, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=SEQ_LEN,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    _pretrained(GPT2LMHeadModel(config)).save_pretrained(directory)
    return directory


def _pretrained(model: torch.nn.Module) -> torch.nn.Module:
    """Weights unlike a fresh initialisation's: its loss is far from ln(vocabulary), which any freshly
    initialised model gives, so a load that left weights at their initial values cannot pass."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4)
    return model


def token_blocks(count: int = 64) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, SEQ_LEN), generator=torch.Generator().manual_seed(7))


def reference_loss(directory: Path, rows: int, seed: int) -> float:
    """transformers' own loss of its own from_pretrained model on the first ``rows`` blocks a shuffled training
    loader reads (the training data is shuffled under several processes, as Lightning's): PyTorch's
    DistributedSampler's order for ``seed``, which every world size splits among its ranks."""
    from torch.utils.data import DistributedSampler
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    blocks = token_blocks()
    order = list(DistributedSampler(blocks, num_replicas=1, rank=0, shuffle=True, seed=seed))
    batch = blocks[order[:rows]]
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()
