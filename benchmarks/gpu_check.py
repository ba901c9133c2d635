"""One command that runs every CUDA/NCCL path shardtrain has on one GPU, and the 1B FSDP benchmark.

    python benchmarks/gpu_check.py --jobs 4                  # on one GPU (estimated: about 8 minutes on an H200)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc    # the same code paths on CPU, tiny model

Rows (each in its own processes, world size 1; NCCL on CUDA, gloo on CPU):

* one per strategy that makes sense on one GPU (``ROWS``): the GPT example trains ``steps``
  steps, saving a synchronous checkpoint after step ``a`` and an asynchronous one after step
  ``b``; two new processes resume from each and train to the end. Passes when every loss is
  finite, the losses fall, and the resumed steps' losses equal the uninterrupted run's
  (``--resume-tolerance``, default 0: exact). The model has dropout, so a checkpoint that lost
  an RNG stream shows in the losses. On CUDA the row processes run with
  ``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, so the
  resumed and the uninterrupted run pick the same deterministic kernels and exact equality is
  the test there too. On CUDA a row also checks what it ran on: parameters on the GPU (pinned
  CPU memory under ``fsdp_cpu_offload``), an NCCL process group, a CUDA RNG state in both
  checkpoints.
* ``benchmark``: a ~1.2B-parameter GPT (``common.MODELS["gpt1b"]``) in bf16-mixed under FSDP:
  the hand-written FSDP2 loop (``reference_fsdp.py``), shardtrain's Trainer
  (``shardtrain_trainer.py``) and, when ``lightning`` imports, Lightning's Trainer with its
  ``FSDPStrategy``; tokens/s, MFU against the peak the ThroughputMonitor uses (the datasheet's
  dense bf16 figure on a known GPU), and peak ``max_memory_allocated`` against
  ``shardtrain.estimate_memory``'s FSDP figure.

A failing row does not stop the others. Everything goes to ``<out>/gpu_check.json`` (processes'
logs and checkpoints under ``<out>/work/``), the table is printed and written to
``<out>/table.txt``, and the exit code is 1 when any row failed.

``--dry-run`` runs the same code on CPU with a tiny model and fewer steps; ``torch.compile`` there
uses the ``aot_eager`` backend (dynamo and AOTAutograd; Inductor's C++ build takes minutes on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "src")]

import run as benchmark  # noqa: E402  (benchmarks/run.py: the commands and FLOP count of the benchmark)

ROWS_SCRIPT = HERE / "gpu_check_rows.py"
BENCHMARK = "benchmark"


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    strategy: str
    precision: str
    options: dict = field(default_factory=dict)
    cpu_options: dict | None = None  # what the dry-run uses instead, where the GPU's choice is impractical on CPU


ROWS = [
    Row("single", "single", "32-true"),
    Row("ddp", "ddp", "32-true"),
    Row("fsdp_bf16_ac", "fsdp", "bf16-mixed", {"activation_checkpointing_policy": ["Block"]}),
    Row("fsdp_compile", "fsdp", "bf16-mixed", {"compile": True}, {"compile": {"backend": "aot_eager"}}),
    Row("fsdp_cpu_offload", "fsdp_cpu_offload", "bf16-mixed"),
    Row("deepspeed_stage_3", "deepspeed_stage_3", "bf16-mixed"),
]


@dataclass(frozen=True, slots=True)
class Settings:
    accelerator: str
    model: dict  # GPTConfig fields of the check rows' model
    steps: int
    batch_size: int
    save_sync_at: int
    save_async_at: int
    bench_model: str  # a key of common.MODELS
    bench_batch_size: int
    bench_steps: int
    bench_warmup: int
    timeout: float  # seconds, per process


GPU = Settings(
    accelerator="cuda",
    model={"n_layer": 4, "n_head": 8, "d_model": 512, "seq_len": 256, "dropout": 0.1},
    steps=20,
    batch_size=8,
    save_sync_at=8,
    save_async_at=14,
    bench_model="gpt1b",
    bench_batch_size=8,
    bench_steps=20,
    bench_warmup=5,
    timeout=300,
)
DRY_RUN = Settings(
    accelerator="cpu",
    model={"n_layer": 2, "n_head": 2, "d_model": 64, "seq_len": 32, "dropout": 0.1},
    steps=8,
    batch_size=8,
    save_sync_at=3,
    save_async_at=5,
    bench_model="small",
    bench_batch_size=4,
    bench_steps=5,
    bench_warmup=2,
    timeout=300,
)


# ---------------------------------------------------------------------------- processes
def environment() -> dict[str, str]:
    """The benchmark's environment (no launcher layout leaking in), with this checkout's sources first
    on the path and whatever PYTHONPATH held kept (wheels carried to a GPU machine live there)."""
    env = benchmark.environment({"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


def execute(command: list[str], log: Path, timeout: float) -> tuple[int | str, str, float]:
    """Run ``command`` (its whole process group killed at ``timeout``); returns (exit code or 'timeout', output tail, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | str = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
    tail = log.read_text(errors="replace")[-3000:]
    return code, tail, time.perf_counter() - start


# ---------------------------------------------------------------------------- check rows
def check_row(row: Row, settings: Settings, work: Path, tolerance: float) -> dict:
    cuda = settings.accelerator == "cuda"
    options = row.options if cuda or row.cpu_options is None else row.cpu_options
    base = [
        *(sys.executable, str(ROWS_SCRIPT), "train", "--accelerator", settings.accelerator),
        *("--strategy", row.strategy, "--strategy-options", json.dumps(options), "--precision", row.precision),
        *("--steps", str(settings.steps), "--batch-size", str(settings.batch_size)),
        *("--model", json.dumps(settings.model), *(["--deterministic"] if cuda else [])),
    ]
    result = {"name": row.name, "strategy": row.strategy, "precision": row.precision, "options": options}
    result.update(status="fail", checks={}, seconds=0.0, error=None)

    def process(part: str, *extra: str) -> dict | None:
        out = work / row.name / part
        code, tail, seconds = execute([*base, "--out", str(out), *extra], out / "output.log", settings.timeout)
        result["seconds"] += seconds
        if code != 0:
            result["error"] = f"{part}: exit {code}\n{tail}"
            return None
        return json.loads((out / "result.json").read_text())

    full = process("full", "--save-sync-at", str(settings.save_sync_at), "--save-async-at", str(settings.save_async_at))
    if full is None:
        return result
    losses = full["losses"]
    quarter = max(1, len(losses) // 4)
    checks = result["checks"]
    checks["all_steps"] = full["steps"] == list(range(1, settings.steps + 1))
    checks["finite"] = full["finite"]
    checks["falling"] = full["finite"] and statistics.fmean(losses[-quarter:]) < statistics.fmean(losses[:quarter])
    result.update(losses=losses, facts={k: v for k, v in full.items() if k not in ("losses", "steps")}, resumed={})
    for kind, at in (("sync", settings.save_sync_at), ("async", settings.save_async_at)):
        saved = full["checkpoints"].get(kind)
        resumed = process(f"resume_{kind}", "--ckpt-path", saved["path"]) if saved else None
        if resumed is None:
            checks[f"resume_{kind}"] = False
            continue
        difference = max((abs(a - b) for a, b in zip(resumed["losses"], losses[at:])), default=math.inf)
        same_steps = resumed["steps"] == list(range(at + 1, settings.steps + 1))
        checks[f"resume_{kind}"] = same_steps and difference <= tolerance
        result["resumed"][kind] = {"from_step": at, "losses": resumed["losses"], "max_abs_difference": difference}
    if cuda:
        offloaded = row.strategy == "fsdp_cpu_offload"
        checks["on_gpu"] = full["parameter_device"] == ("cpu" if offloaded else "cuda") and full["device"] != "cpu"
        if offloaded:
            checks["offload_pinned"] = full["parameter_pinned"] is True
        if row.strategy not in ("single", "ddp"):  # DDP with one process wraps nothing and joins no group, as single
            checks["nccl"] = full["backend"] == "nccl"
        checks["cuda_rng_saved"] = all(c["has_cuda_rng"] for c in full["checkpoints"].values())
    if all(checks.values()):
        result["status"] = "pass"
    elif result["error"] is None:
        result["error"] = "failed checks: " + ", ".join(name for name, ok in checks.items() if not ok)
    return result


# ---------------------------------------------------------------------------- the benchmark
def run_benchmark(settings: Settings, work: Path) -> dict:
    from common import MODELS
    from examples.gpt.model import GPTModule
    from shardtrain import estimate_memory

    config = MODELS[settings.bench_model]
    common = [
        *("--steps", str(settings.bench_steps), "--warmup", str(settings.bench_warmup)),
        *("--model", settings.bench_model, "--batch-size", str(settings.bench_batch_size)),
        *("--precision", "bf16-mixed"),
    ]
    estimate = estimate_memory(
        GPTModule(config), devices=1, precision="bf16-mixed", batch_size=settings.bench_batch_size
    )
    estimated = estimate.get("fsdp").device_total
    report = {
        "model": settings.bench_model,
        "parameters": config.num_parameters,
        "batch_size": settings.bench_batch_size,
        "seq_len": config.seq_len,
        "steps": settings.bench_steps,
        "warmup": settings.bench_warmup,
        "precision": "bf16-mixed",
        "model_flops_per_token": benchmark.model_flops_per_token(settings.bench_model),
        "estimated_fsdp_bytes": estimated,
        "sides": {},
    }
    sides = {
        "reference": lambda out: benchmark.reference_command("fsdp", 1, out, common),
        "shardtrain": lambda out: benchmark.shardtrain_command("fsdp", 1, out, common),
        "lightning": lambda out: [sys.executable, str(ROWS_SCRIPT), "lightning", "--out", str(out), *common],
    }
    for side, command in sides.items():
        note = None
        if side == "lightning" and importlib.util.find_spec("lightning") is None:
            note = "lightning is not importable here: the Lightning column is skipped"
        elif side == "lightning" and settings.accelerator != "cuda":
            note = "Lightning's FSDPStrategy refuses CPU: the Lightning column is skipped"
        if note:
            print(f"[gpu_check] {note}", flush=True)
            report["sides"][side] = {"status": "skipped", "error": note}
            continue
        out = work / BENCHMARK / side
        code, tail, seconds = execute(command(out), out / "output.log", settings.timeout)
        figures = json.loads((out / "rank0.json").read_text()) if code == 0 and (out / "rank0.json").is_file() else None
        if figures is None:
            report["sides"][side] = {"status": "fail", "error": f"exit {code}\n{tail}", "seconds": seconds}
            continue
        figures["peak_over_estimate"] = figures["peak_memory_bytes"] / estimated
        report["sides"][side] = {"status": "pass", "seconds": seconds, **figures}
    ours = report["sides"]["shardtrain"]
    report["peak_flops"], report["peak_source"] = ours.get("monitor_peak_flops"), ours.get("monitor_peak_source")
    for side in report["sides"].values():
        if side["status"] == "pass" and report["peak_flops"]:
            side["mfu"] = side["tokens_per_sec"] * report["model_flops_per_token"] / report["peak_flops"]
    reference = report["sides"]["reference"]
    if reference["status"] == "pass" and ours["status"] == "pass":
        report["ratio_tokens_per_sec"] = ours["tokens_per_sec"] / reference["tokens_per_sec"]
        report["ratio_peak_memory"] = ours["peak_memory_bytes"] / reference["peak_memory_bytes"]
    report["status"] = "fail" if any(s["status"] == "fail" for s in report["sides"].values()) else "pass"
    return report


# ---------------------------------------------------------------------------- report
def table(report: dict) -> str:
    lines = [
        f"gpu_check {report['mode']} {report['date']}: torch {report['torch']}, CUDA {report['cuda']}, "
        f"{report['gpu'] or 'no GPU'}",
        f"{'row':20}{'status':8}{'loss first -> last':22}{'resume |diff| sync / async':28}{'seconds':>8}",
    ]
    for row in report["rows"]:
        losses = row.get("losses") or []
        curve = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
        resumed = row.get("resumed", {})
        diffs = " / ".join(
            f"{resumed[k]['max_abs_difference']:.3g}" if k in resumed else "-" for k in ("sync", "async")
        )
        lines.append(f"{row['name']:20}{row['status']:8}{curve:22}{diffs:28}{row['seconds']:8.1f}")
        if row["status"] != "pass":
            lines.append("    " + (row["error"] or "").strip().splitlines()[-1][:200])
    bench = report.get("benchmark")
    if bench:
        peak = (
            f"{bench['peak_flops'] / 1e9:,.0f} GFLOP/s ({bench['peak_source']})" if bench["peak_flops"] else "unknown"
        )
        lines += [
            "",
            f"benchmark: {bench['model']} ({bench['parameters'] / 1e6:,.1f}M parameters), {bench['precision']}, batch "
            f"{bench['batch_size']} x {bench['seq_len']}, {bench['steps']} steps ({bench['warmup']} warm-up), FSDP, "
            f"1 process; peak {peak}; estimate_memory (fsdp): {bench['estimated_fsdp_bytes'] / 2**30:.2f} GiB",
            f"{'side':12}{'status':9}{'tokens/s':>12}{'MFU':>8}{'step (s)':>10}{'peak GiB':>10}{'peak/est.':>10}",
        ]
        for name, side in bench["sides"].items():
            if side["status"] != "pass":
                lines.append(f"{name:12}{side['status']:9}  {(side['error'] or '').strip().splitlines()[-1][:150]}")
                continue
            mfu = f"{side['mfu']:.1%}" if "mfu" in side else "-"
            lines.append(
                f"{name:12}{'pass':9}{side['tokens_per_sec']:12,.0f}{mfu:>8}{side['step_time_median']:10.4f}"
                f"{side['peak_memory_bytes'] / 2**30:10.2f}{side['peak_over_estimate']:10.2f}"
            )
        if "ratio_tokens_per_sec" in bench:
            lines.append(
                f"shardtrain / reference: tokens/s {bench['ratio_tokens_per_sec']:.3f}, "
                f"peak memory {bench['ratio_peak_memory']:.3f}"
            )
    lines.append(f"\n{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few steps: check the script itself")
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/gpu (runs/gpu_check_dry_run with --dry-run)"
    )
    names = [row.name for row in ROWS] + [BENCHMARK]
    parser.add_argument("--rows", nargs="+", default=names, choices=names, metavar="ROW", help=f"of: {' '.join(names)}")
    parser.add_argument("--jobs", type=int, default=1, help="check rows run at once (the benchmark always runs alone)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process (default 300)")
    parser.add_argument("--resume-tolerance", type=float, default=0.0, help="largest |resumed - uninterrupted| loss")
    args = parser.parse_args(argv)

    import torch

    settings = DRY_RUN if args.dry_run else GPU
    if args.timeout is not None:
        settings = dataclasses.replace(settings, timeout=args.timeout)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; pass --dry-run to run the same paths on CPU")
    out = Path(args.out or (ROOT / ("runs/gpu_check_dry_run" if args.dry_run else "benchmarks/results/gpu")))
    work = out / "work"
    start = time.perf_counter()
    report: dict = {
        "mode": "dry-run (CPU)" if args.dry_run else "GPU",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None if args.dry_run else torch.cuda.get_device_name(),
        "python": platform.python_version(),
        "settings": dataclasses.asdict(settings),
        "resume_tolerance": args.resume_tolerance,
    }
    selected = [row for row in ROWS if row.name in args.rows]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        report["rows"] = list(pool.map(lambda row: check_row(row, settings, work, args.resume_tolerance), selected))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))  # the rows' results, should the benchmark not end
    if BENCHMARK in args.rows:
        try:
            report["benchmark"] = run_benchmark(settings, work)
        except Exception as error:  # a failing benchmark must not lose the rows' results
            report["benchmark_error"] = repr(error)
    report["passed"] = (
        all(row["status"] == "pass" for row in report["rows"])
        and report.get("benchmark", {}).get("status", "pass") == "pass"
        and "benchmark_error" not in report
    )
    report["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    text = table(report) + (f"\nbenchmark error: {report['benchmark_error']}" if "benchmark_error" in report else "")
    (out / "table.txt").write_text(text + "\n")
    print(text)
    print(f"results: {out / 'gpu_check.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
