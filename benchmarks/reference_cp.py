"""Hand-written context parallelism, as torchtitan writes it: PyTorch's ``context_parallel`` over the ``cp``
sub-mesh around each step's forward and backward (the tokens, targets and positions split along the sequence
with its load balancer), ``fully_shard`` per block and the root over data x context ranks, built on the meta
device and initialised in place; started by torchrun.

On CPU, PyTorch's ring attention lacks the CPU attention kernel; both sides register the same handler for it
(``shardtrain.parallel.context_parallel.register_cpu_ring_attention``), the one piece of shardtrain used here.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.experimental import context_parallel

from common import StepTimer, backend, benchmark_arguments, device, finish, loader, model_config
from examples.gpt.model import GPT
from shardtrain.parallel.context_parallel import register_cpu_ring_attention

args = benchmark_arguments()
dist.init_process_group(backend())
config = model_config(args)
where = device()
cp = args.context_parallel
dp = dist.get_world_size() // cp
mesh = init_device_mesh(where.type, (dp, cp), mesh_dim_names=("dp", "cp"))
shard_mesh = mesh["dp", "cp"]._flatten("dp_cp")
bf16 = args.precision == "bf16-mixed"
policy = (
    MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
)
torch.manual_seed(0)
with torch.device("meta"):
    model = GPT(config)
for block in model.blocks:
    fully_shard(block, mesh=shard_mesh, mp_policy=policy)
fully_shard(model, mesh=shard_mesh, mp_policy=policy)
model.to_empty(device=where)
model.head.weight = model.token_embedding.weight
with torch.no_grad():
    model.init_weights()
if where.type == "cpu":
    register_cpu_ring_attention()
assert math.prod(mesh.shape) == dist.get_world_size()

optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
timer = StepTimer()
timer.tick()
for step, (x, y) in enumerate(loader(config, args, dp, mesh["dp"].get_local_rank())):
    if step == args.steps:
        break
    x, y = x.to(where, non_blocking=True), y.to(where, non_blocking=True)
    positions = torch.arange(x.shape[1], device=where)
    with context_parallel(
        mesh["cp"], buffers=[x, y, positions], buffer_seq_dims=[1, 1, 0], no_restore_buffers={x, y, positions}
    ):
        logits = model(x, positions)  # FSDP casts the parameters itself under bf16-mixed: no autocast
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer.tick()
finish(args, timer, config)
dist.barrier()
dist.destroy_process_group()
