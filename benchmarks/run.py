"""Run shardtrain and the hand-written reference in turn, same model, data, batch and process count.

    python benchmarks/run.py                 # 46M-parameter GPT, 2 processes, 20 steps (a few minutes on 2 cores)
    python benchmarks/run.py --small         # a tiny model, for a smoke test

Prints tokens/s, median step time and spread, peak memory per rank, and the ratio ours/reference;
writes everything to ``benchmarks/results/ddp.json``.
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


def run(command: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    subprocess.run(command, env=env, cwd=ROOT, check=True)
    ranks = sorted(out.glob("rank*.json"))
    results = [json.loads(path.read_text()) for path in ranks]
    return {
        "tokens_per_sec": results[0]["tokens_per_sec"],
        "step_time_median": results[0]["step_time_median"],
        "step_time_spread": results[0]["step_time_spread"],
        "peak_memory_per_rank_bytes": max(r["peak_memory_bytes"] for r in results),
        "ranks": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    common = ["--steps", str(args.steps)] + (["--small"] if args.small else [])
    port = 29400 + os.getpid() % 1000
    reference_out, ours_out = out / "reference_ddp", out / "shardtrain_ddp"
    for directory in (reference_out, ours_out):
        for stale in directory.glob("rank*.json"):
            stale.unlink()
    reference = run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.devices}", f"--master-port={port}", str(HERE / "reference_ddp.py"), "--out", str(reference_out), *common],
        reference_out,
    )
    ours = run([sys.executable, str(HERE / "shardtrain_ddp.py"), "--out", str(ours_out), "--devices", str(args.devices), *common], ours_out)
    report = {
        "config": {"model": "small" if args.small else "gpt-46M", "devices": args.devices, "steps": args.steps},
        "reference_ddp": reference,
        "shardtrain_ddp": ours,
        "ratio_tokens_per_sec": ours["tokens_per_sec"] / reference["tokens_per_sec"],
        "ratio_step_time": ours["step_time_median"] / reference["step_time_median"],
        "ratio_peak_memory": ours["peak_memory_per_rank_bytes"] / reference["peak_memory_per_rank_bytes"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp.json").write_text(json.dumps(report, indent=2))
    print(f"{'':18}{'tokens/s':>10}{'step (s)':>10}{'spread':>9}{'peak MiB/rank':>15}")
    for name in ("reference_ddp", "shardtrain_ddp"):
        r = report[name]
        print(f"{name:18}{r['tokens_per_sec']:10.0f}{r['step_time_median']:10.3f}{r['step_time_spread']:9.3f}{r['peak_memory_per_rank_bytes'] / 2**20:15.0f}")
    print(f"ratio shardtrain/reference: tokens/s {report['ratio_tokens_per_sec']:.3f}, step time {report['ratio_step_time']:.3f}, peak memory {report['ratio_peak_memory']:.3f}")


if __name__ == "__main__":
    main()
