"""Hand-written tensor parallelism, and FSDP x TP when there are more ranks than one group: plain
PyTorch as torchtitan writes it (``parallelize_module`` per block on the ``tp`` sub-mesh, the tied
embedding and output layer split by vocabulary, then ``fully_shard`` per block and the root on the
``dp`` sub-mesh), built on the meta device and initialised in place; started by torchrun."""

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from common import model_config, backend, benchmark_arguments, device, loader, reference_training_loop
from examples.gpt.model import GPT

args = benchmark_arguments()
dist.init_process_group(backend())
config = model_config(args)
where = device()
tp = args.tensor_parallel
dp = dist.get_world_size() // tp
mesh = init_device_mesh(where.type, (dp, tp), mesh_dim_names=("dp", "tp"))
torch.manual_seed(0)
with torch.device("meta"):
    model = GPT(config)
parallelize_module(
    model,
    mesh["tp"],
    {
        "token_embedding": RowwiseParallel(input_layouts=Replicate()),
        "head": ColwiseParallel(output_layouts=Replicate()),
    },
)
model.head.weight = model.token_embedding.weight  # both split by vocabulary rows: tie them again
for block in model.blocks:
    plan = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel()}
    parallelize_module(block, mesh["tp"], plan | {"mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()})
if dp > 1:
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"], reshard_after_forward=False)
model.to_empty(device=where)
model.head.weight = model.token_embedding.weight
with torch.no_grad():
    model.init_weights()


def clip(parameters: list[torch.Tensor]) -> torch.Tensor:
    """The norm of the whole gradient: split (2-D or tp mesh), FSDP-only (dp mesh) and plain gradients
    are reduced apart, then combined (torch's norm cannot mix meshes)."""
    groups: dict = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.stack(norms).pow(2).sum().sqrt()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, 1.0, total, foreach=True)
    return total


data_rank = mesh["dp"].get_local_rank()
assert math.prod(mesh.shape) == dist.get_world_size()
reference_training_loop(model, config, args, where, batches=loader(config, args, dp, data_rank), clip=clip)
