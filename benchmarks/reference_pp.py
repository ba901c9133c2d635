"""Hand-written pipeline parallelism: plain ``torch.distributed.pipelining`` as a user writes it without
shardtrain. Each rank builds its own stage module on the meta device (written for the pipeline: the first
stage's ``forward`` takes tokens, the last returns logits), initialises it in place, and runs PyTorch's
schedule. The output layer's weight is tied to the embedding on one process, so, as Megatron-LM does, the
first and last stages keep a copy each and sum their gradients before the step. Clipping takes the norm
over both stages (one all-reduce). Started by torchrun, one stage per process."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class

from common import model_config, StepTimer, backend, benchmark_arguments, device, finish, loader
from examples.gpt.model import Block

args = benchmark_arguments()
dist.init_process_group(backend())
config = model_config(args)
where = device()
rank, stages = dist.get_rank(), dist.get_world_size()
assert stages == args.pipeline_parallel == 2, "two stages, one per process (the tied weight's sum spans both)"
per_stage = config.n_layer // stages
first, last = rank == 0, rank == stages - 1


class Stage(nn.Module):
    """The GPT example's layers that this stage runs, with a forward written for it."""

    def __init__(self) -> None:
        super().__init__()
        if first:
            self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
            self.position_embedding = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(per_stage))
        if last:
            self.norm = nn.LayerNorm(config.d_model, bias=config.bias)
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if first:
            x = self.token_embedding(x) + self.position_embedding(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) if last else x


torch.manual_seed(rank)
with torch.device("meta"):
    model = Stage()
model.to_empty(device=where)
with torch.no_grad():
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    tied = model.token_embedding.weight if first else model.head.weight if last else None
    if tied is not None:
        nn.init.normal_(tied, std=0.02)
        dist.broadcast(tied, src=0)  # the copies start equal

microbatches = args.microbatches or stages
stage = PipelineStage(model, rank, stages, where)
schedule = get_schedule_class(args.schedule)(
    stage,
    n_microbatches=microbatches,
    loss_fn=lambda logits, y: F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
parameters = list(model.parameters())
counted = [p for p in parameters if not (last and p is model.head.weight)]  # the tied weight counts once
timer = StepTimer()
timer.tick()
for step, (x, y) in enumerate(loader(config, args, 1, 0)):  # every stage reads the one batch
    if step == args.steps:
        break
    x, y = x.to(where, non_blocking=True), y.to(where, non_blocking=True)
    if first:
        schedule.step(x)
    elif last:
        schedule.step(target=y, losses=[])
    else:
        schedule.step()
    if tied is not None:
        dist.all_reduce(tied.grad)  # first and last stage (2 stages: the whole group)
    norm = torch.nn.utils.get_total_norm([p.grad for p in counted], foreach=True).pow(2)
    dist.all_reduce(norm)
    torch.nn.utils.clip_grads_with_norm_(parameters, 1.0, norm.sqrt(), foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer.tick()
finish(args, timer, config)
dist.barrier()
dist.destroy_process_group()
