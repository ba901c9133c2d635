"""What both sides of a benchmark share: the model sizes, the data, the command line, the timing record."""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.gpt.data import corpus_splits  # noqa: E402
from examples.gpt.model import GPTConfig  # noqa: E402

#: Model sizes. ``gpt38m`` is the issue's reference shape (12 layers, d=512, seq 256; 38M
#: parameters with our 256-byte vocabulary); ``gpt1b`` is for one large GPU.
MODELS = {
    "small": GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=64),
    "gpt38m": GPTConfig(n_layer=12, n_head=8, d_model=512, seq_len=256),
    "gpt1b": GPTConfig(n_layer=24, n_head=16, d_model=2048, seq_len=1024),
    # Long sequences on CPU (longest_sequence.py): narrow and shallow, so that a step at 16k tokens stays short.
    "gpt_long": GPTConfig(n_layer=4, n_head=4, d_model=256, seq_len=2048),
}


def dataset(config: GPTConfig):
    train, _ = corpus_splits(config.seq_len)
    return train


class StepTimer:
    """Wall time between consecutive optimizer steps (synchronising CUDA only here, in the benchmark)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def tick(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def benchmark_arguments(parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line both sides take (the shardtrain side adds its strategy options)."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="gpt38m", choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per process per step")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--stage", type=int, default=2, help="DeepSpeed ZeRO stage")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="ranks per tensor-parallel group")
    parser.add_argument("--pipeline-parallel", type=int, default=1, help="pipeline stages (one per rank)")
    parser.add_argument("--microbatches", type=int, default=None, help="pipeline micro-batches per batch")
    parser.add_argument("--schedule", default="1f1b", help="pipeline schedule (torch.distributed.pipelining)")
    parser.add_argument("--context-parallel", type=int, default=1, help="ranks that split each sequence")
    parser.add_argument("--seq-len", type=int, default=None, help="the model's sequence length (default: its own)")
    return parser.parse_args()


def model_config(args: argparse.Namespace) -> GPTConfig:
    """``--model``'s configuration, with ``--seq-len`` when given."""
    config = MODELS[args.model]
    return dataclasses.replace(config, seq_len=args.seq_len) if args.seq_len else config


def device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    if args.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loader(config: GPTConfig, args: argparse.Namespace, replicas: int | None = None, rank: int | None = None):
    """This rank's share of the data: DistributedSampler over the embedded corpus, in order, as
    shardtrain's Trainer makes it from a ``shuffle=False, drop_last=True`` loader (``replicas`` and
    ``rank``: the data-parallel ones, where they are not the world's)."""
    from torch.utils.data import DataLoader, DistributedSampler

    data = dataset(config)
    sampler = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=False, drop_last=True)
    return DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)


def reference_training_loop(
    model: torch.nn.Module,
    config: GPTConfig,
    args: argparse.Namespace,
    device: torch.device,
    batches=None,
    clip=None,
) -> None:
    """The plain PyTorch loop the references run: AdamW, clipping at 1.0, nothing else (``batches``
    and ``clip`` where the layout needs its own: tensor parallelism)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    clip = clip or (lambda parameters: torch.nn.utils.clip_grad_norm_(parameters, 1.0, foreach=True))
    timer = StepTimer()
    timer.tick()
    for step, (x, y) in enumerate(batches if batches is not None else loader(config, args)):
        if step == args.steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(args, device):
            logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        clip(list(model.parameters()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.tick()
    finish(args, timer, config)
    dist.barrier()
    dist.destroy_process_group()


def finish(args: argparse.Namespace, timer: StepTimer, config: GPTConfig, extra: dict | None = None) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    # a TP group's, a pipeline's or a context-parallel group's ranks share one batch
    batches = world // (args.tensor_parallel * args.pipeline_parallel * args.context_parallel)
    write_result(
        Path(args.out), rank, timer.times, args.warmup, args.batch_size * batches * config.seq_len, extra or {}
    )


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_result(out: Path, rank: int, times: list[float], warmup: int, tokens_per_step: int, extra: dict) -> None:
    measured = times[warmup:]
    if not measured:
        raise SystemExit(f"no timed steps: {len(times)} steps ran and the first {warmup} are warm-up; raise --steps")
    result = {
        "step_time_median": statistics.median(measured),
        "step_time_spread": max(measured) - min(measured),
        "tokens_per_sec": tokens_per_step / statistics.median(measured),
        "peak_memory_bytes": peak_memory_bytes(),
        "steps_timed": len(measured),
        **extra,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
