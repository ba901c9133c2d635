"""Hand-written FSDP2 training: plain PyTorch (fully_shard per block, then the root), started by torchrun."""

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from common import model_config, backend, benchmark_arguments, device, reference_training_loop
from examples.gpt.model import GPT

args = benchmark_arguments()
dist.init_process_group(backend())
config = model_config(args)
where = device()
torch.manual_seed(0)
model = GPT(config).to(where)
mesh = init_device_mesh(where.type, (dist.get_world_size(),))
bf16 = args.precision == "bf16-mixed"
policy = (
    MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
)
args.precision = "32-true"  # FSDP casts the parameters itself: no autocast in the loop
for block in model.blocks:
    if args.activation_checkpointing:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    fully_shard(block, mesh=mesh, mp_policy=policy)
fully_shard(model, mesh=mesh, mp_policy=policy)
reference_training_loop(model, config, args, where)
