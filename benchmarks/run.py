"""Run shardtrain and the hand-written PyTorch reference in turn: same model, data, batch, process count.

    python benchmarks/run.py                        # DDP, FSDP, FSDP + activation checkpointing; 46M GPT, 2 processes
    python benchmarks/run.py --configs fsdp --steps 10
    python benchmarks/run.py --small                # a tiny model: a smoke test of the harness

For each configuration it prints tokens/s, median step time and spread, peak memory per rank
(RSS on CPU, max_memory_allocated on CUDA), and the ratio shardtrain / reference. Results go to
``benchmarks/results/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: configuration -> (reference script and its flags, shardtrain flags)
CONFIGS = {
    "ddp": (["reference_ddp.py"], ["--strategy", "ddp"]),
    "fsdp": (["reference_fsdp.py"], ["--strategy", "fsdp"]),
    "fsdp_ac": (["reference_fsdp.py", "--activation-checkpointing"], ["--strategy", "fsdp", "--activation-checkpointing"]),
}


def run(command: list[str], out: Path, extra_env: dict[str, str]) -> dict:
    for stale in out.glob("rank*.json"):
        stale.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", **extra_env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    subprocess.run(command, env=env, cwd=ROOT, check=True)
    results = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return {
        "tokens_per_sec": results[0]["tokens_per_sec"],
        "step_time_median": results[0]["step_time_median"],
        "step_time_spread": results[0]["step_time_spread"],
        "peak_memory_per_rank_bytes": max(r["peak_memory_bytes"] for r in results),
        "ranks": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--pinned-malloc",
        action="store_true",
        help="run both sides with MALLOC_MMAP_THRESHOLD_=131072, so that CPU RSS tracks live tensors rather than "
        "what glibc keeps of freed ones (which depends on allocation order)",
    )
    args = parser.parse_args()
    extra_env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if args.pinned_malloc else {}
    out = Path(args.out)
    common = ["--steps", str(args.steps)] + (["--small"] if args.small else [])
    report: dict = {"model": "small" if args.small else "gpt-38M (12 layers, d=512, seq 256)", "devices": args.devices, "steps": args.steps, "pinned_malloc": args.pinned_malloc, "configs": {}}
    for index, name in enumerate(args.configs):
        reference_args, ours_args = CONFIGS[name]
        port = 29400 + (os.getpid() + index) % 1000
        reference = run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.devices}", f"--master-port={port}",
             str(HERE / reference_args[0]), *reference_args[1:], "--out", str(out / name / "reference"), *common],
            out / name / "reference",
            extra_env,
        )
        ours = run(
            [sys.executable, str(HERE / "shardtrain_trainer.py"), *ours_args, "--devices", str(args.devices), "--out", str(out / name / "shardtrain"), *common],
            out / name / "shardtrain",
            extra_env,
        )
        report["configs"][name] = {
            "reference": reference,
            "shardtrain": ours,
            "ratio_tokens_per_sec": ours["tokens_per_sec"] / reference["tokens_per_sec"],
            "ratio_peak_memory": ours["peak_memory_per_rank_bytes"] / reference["peak_memory_per_rank_bytes"],
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"{report['model']}, {args.devices} processes, {args.steps} steps{', pinned malloc' if args.pinned_malloc else ''}")
    print(f"{'config':10}{'side':12}{'tokens/s':>10}{'step (s)':>10}{'spread':>9}{'peak MiB/rank':>15}")
    for name, entry in report["configs"].items():
        for side in ("reference", "shardtrain"):
            r = entry[side]
            print(f"{name:10}{side:12}{r['tokens_per_sec']:10.0f}{r['step_time_median']:10.3f}{r['step_time_spread']:9.3f}{r['peak_memory_per_rank_bytes'] / 2**20:15.0f}")
        print(f"{name:10}{'ratio':12}{entry['ratio_tokens_per_sec']:10.3f}{'':19}{entry['ratio_peak_memory']:15.3f}")


if __name__ == "__main__":
    main()
