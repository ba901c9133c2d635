"""Hand-written DDP training: plain PyTorch, started by torchrun. The reference shardtrain must match."""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import model_config, backend, benchmark_arguments, device, reference_training_loop
from examples.gpt.model import GPT

args = benchmark_arguments()
dist.init_process_group(backend())
config = model_config(args)
where = device()
torch.manual_seed(0)
model = GPT(config).to(where)
model = DistributedDataParallel(
    model, gradient_as_bucket_view=True, device_ids=[where.index] if where.type == "cuda" else None
)
reference_training_loop(model, config, args, where)
