"""Hand-written FSDP2 training: plain PyTorch (fully_shard per block, then the root), started by torchrun."""

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint

from common import MODEL, SMALL, reference_arguments, reference_training_loop
from examples.gpt.model import GPT

args = reference_arguments()
dist.init_process_group("gloo")
config = SMALL if args.small else MODEL
torch.manual_seed(0)
model = GPT(config)
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for block in model.blocks:
    if args.activation_checkpointing:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
reference_training_loop(model, config, args)
