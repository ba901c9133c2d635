"""What both sides of a benchmark share: the model size, the data, the timing record."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.gpt.data import corpus_splits  # noqa: E402
from examples.gpt.model import GPTConfig  # noqa: E402

#: The 46M-parameter GPT of the issue's reference figures: 12 layers, d=512, seq 256.
MODEL = GPTConfig(n_layer=12, n_head=8, d_model=512, seq_len=256)
SMALL = GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=64)


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


def reference_arguments() -> argparse.Namespace:
    """The command line every hand-written reference loop takes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    return parser.parse_args()


def reference_training_loop(model: torch.nn.Module, config: GPTConfig, args: argparse.Namespace) -> None:
    """The plain PyTorch loop both references run: AdamW, clipping at 1.0, no logging, rank-sharded data."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler

    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    data = dataset(config)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=DistributedSampler(data, shuffle=False), drop_last=True)
    timer = StepTimer()
    timer.tick()
    for step, (x, y) in enumerate(loader):
        if step == args.steps:
            break
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.tick()
    write_result(Path(args.out), rank, timer.times, args.warmup, args.batch_size * world * config.seq_len, [])
    dist.barrier()
    dist.destroy_process_group()


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_result(out: Path, rank: int, times: list[float], warmup: int, tokens_per_step: int, losses: list[float]) -> None:
    measured = times[warmup:]
    result = {
        "step_time_median": statistics.median(measured),
        "step_time_spread": (max(measured) - min(measured)) if measured else 0.0,
        "tokens_per_sec": tokens_per_step / statistics.median(measured),
        "peak_memory_bytes": peak_memory_bytes(),
        "losses": losses,
        "steps_timed": len(measured),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
