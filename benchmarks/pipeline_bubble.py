"""The pipeline's bubble, measured: step time against the number of micro-batches, at a fixed micro-batch.

    python benchmarks/pipeline_bubble.py --out runs/bubble                 # 2 stages, 1F1B, 2, 4, 8 micro-batches
    python benchmarks/pipeline_bubble.py --schedules gpipe 1f1b --microbatches 2 4 --out runs/bubble

Each run trains the benchmark GPT through shardtrain's Trainer on 2 processes, one stage each, with
micro-batches of ``--microbatch-size`` sequences, so the work per step grows with the micro-batches M
while the fill and drain of the pipeline do not. A straight line through the step times,
``T(M) = fill + M x per_microbatch``, separates them; ``fill / T(M)`` is the measured bubble, printed
beside GPipe/1F1B's idle fraction in theory, ``(N - 1) / (M + N - 1)`` for N stages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PINNED_MALLOC, run, shardtrain_command  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="gpt38m")
    parser.add_argument("--schedules", nargs="+", default=["1f1b"])
    parser.add_argument("--microbatches", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--microbatch-size", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    out, stages = Path(args.out), 2
    rows = []
    for schedule in args.schedules:
        for microbatches in args.microbatches:
            where = out / schedule / f"m{microbatches}"
            common = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            common += ["--batch-size", str(args.microbatch_size * microbatches), "--schedule", schedule]
            common += ["--pipeline-parallel", str(stages), "--microbatches", str(microbatches)]
            command = [c for c in shardtrain_command("pp", stages, where, common) if c != "--monitor"]
            # the pp config's own --microbatches 4 comes first; the later one wins
            result = run(command, where, PINNED_MALLOC)
            rows.append({"schedule": schedule, "microbatches": microbatches, **result})
    report = fit(rows, stages)
    (out / "bubble.json").write_text(json.dumps(report, indent=2))
    print_table(report)


def fit(rows: list[dict], stages: int) -> list[dict]:
    """Per schedule, the least-squares line through (M, step time), and each run's bubble from it."""
    report = []
    for schedule in dict.fromkeys(row["schedule"] for row in rows):
        mine = [row for row in rows if row["schedule"] == schedule]
        xs = [row["microbatches"] for row in mine]
        ys = [row["step_time_median"] for row in mine]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        fill = mean_y - slope * mean_x
        for row in mine:
            m = row["microbatches"]
            report.append(
                {
                    "schedule": schedule,
                    "microbatches": m,
                    "step_time_s": row["step_time_median"],
                    "tokens_per_sec": row["tokens_per_sec"],
                    "per_microbatch_s": slope,
                    "fill_s": fill,
                    "bubble_measured": fill / row["step_time_median"],
                    "bubble_theory": (stages - 1) / (m + stages - 1),
                }
            )
    return report


def print_table(report: list[dict]) -> None:
    print("\nschedule  micro-batches  step (s)  tokens/s  bubble measured  bubble in theory")
    for r in report:
        print(
            f"{r['schedule']:<9} {r['microbatches']:>13}  {r['step_time_s']:>8.3f}  {r['tokens_per_sec']:>8.0f}"
            f"  {r['bubble_measured']:>15.1%}  {r['bubble_theory']:>16.1%}"
        )
    if report:
        print(f"fit: {report[0]['per_microbatch_s']:.3f} s per micro-batch, {report[0]['fill_s']:.3f} s fill and drain")


if __name__ == "__main__":
    main()
