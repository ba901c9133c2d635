"""The longest sequence that fits a fixed memory per rank, without and with context parallelism.

For each sequence length, shardtrain's benchmark Trainer (``shardtrain_trainer.py``) trains the benchmark GPT for a
few steps on 2 processes twice: ``fsdp`` (no context parallelism: each rank holds whole sequences, one per step) and
``cp`` (``context_parallel_size=2``: the two ranks share one sequence). Each run's peak memory per rank is measured
(RSS on CPU with glibc's mmap threshold pinned, as ``run.py`` does; ``max_memory_allocated`` on CUDA). The report:
the peaks, and for the memory each FSDP run needed, the longest length context 2 fits in it (measured, not
extrapolated: only the lengths run count).

    python benchmarks/longest_sequence.py --lengths 2048 4096 8192 16384
    python benchmarks/longest_sequence.py --configs cp --lengths 24576 32768   # longer ones, context 2 only

Results go to ``<out>/longest_sequence.json``; a later run adds its lengths to the figures already there. The report
also gives the slope: the memory per rank each further token of a sequence costs (from the shortest length run to
the longest), the activations' share, which context parallelism divides.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from run import PINNED_MALLOC, run, shardtrain_command

HERE = Path(__file__).resolve().parent
CONFIGS = ("fsdp", "cp")


def measure(config: str, length: int, args: argparse.Namespace) -> int:
    out = Path(args.out) / config / str(length)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--seq-len", str(length), "--batch-size", "1", "--steps", str(args.steps)]
    common += ["--warmup", "1"]
    print(f"[longest_sequence] {config}, sequences of {length}", flush=True)
    return run(shardtrain_command(config, 2, out, common), out, PINNED_MALLOC)["peak_memory_per_rank_bytes"]


def longest_within(peaks: dict[int, int], budget: int) -> int | None:
    fitting = [length for length, peak in peaks.items() if peak <= budget]
    return max(fitting) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt_long", help="a model of benchmarks/common.py's MODELS")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=2, help="steps per run (the peak is reached in the first)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", default=str(HERE / "results" / "longest_sequence"))
    args = parser.parse_args()
    path = Path(args.out) / "longest_sequence.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    peaks: dict[str, dict[int, int]] = {
        config: {int(k): v for k, v in earlier.get("peak_memory_per_rank_bytes", {}).get(config, {}).items()}
        for config in CONFIGS
    }
    for config in args.configs:
        for length in args.lengths:
            peaks[config][length] = measure(config, length, args)
    mib = 2**20
    print("\n| sequence | peak per rank, no context parallelism (fsdp) | context 2 | ratio |")
    print("| --- | --- | --- | --- |")
    for length in sorted(set(peaks["fsdp"]) | set(peaks["cp"])):
        fsdp, cp = peaks["fsdp"].get(length), peaks["cp"].get(length)
        cells = [f"{value / mib:.0f} MiB" if value else "not run" for value in (fsdp, cp)]
        ratio = f"{cp / fsdp:.2f}" if fsdp and cp else ""
        print(f"| {length} | {cells[0]} | {cells[1]} | {ratio} |")
    fits = {
        str(length): {"budget_bytes": budget, "fsdp": length, "cp": longest_within(peaks["cp"], budget)}
        for length, budget in sorted(peaks["fsdp"].items())
    }
    print("\nIn the memory per rank FSDP needed for a sequence, the longest sequence context 2 fitted (of those run):")
    for length, fit in fits.items():
        print(f"  {fit['budget_bytes'] / mib:.0f} MiB: fsdp {length}, context 2 {fit['cp']}")
    slopes = {}
    for config, measured in peaks.items():
        if len(measured) >= 2:
            low, high = min(measured), max(measured)
            slopes[config] = (measured[high] - measured[low]) / (high - low)
            print(f"  {config}: {slopes[config] / 1024:.1f} KiB per rank per further token ({low} to {high})")
    results = {
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "processes": 2,
        "peak_memory_per_rank_bytes": {
            config: {str(k): v for k, v in sorted(p.items())} for config, p in peaks.items()
        },
        "longest_in_fsdp_budget": fits,
        "bytes_per_rank_per_token": slopes,
    }
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n[longest_sequence] wrote {path}")


if __name__ == "__main__":
    main()
