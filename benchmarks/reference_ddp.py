"""Hand-written DDP training: plain PyTorch, started by torchrun. The reference shardtrain must match."""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import MODEL, SMALL, reference_arguments, reference_training_loop
from examples.gpt.model import GPT

args = reference_arguments()
dist.init_process_group("gloo")
config = SMALL if args.small else MODEL
torch.manual_seed(0)
model = DistributedDataParallel(GPT(config), gradient_as_bucket_view=True)
reference_training_loop(model, config, args)
