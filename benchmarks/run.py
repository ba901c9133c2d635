"""Run shardtrain and the hand-written reference in alternation: same model, data, batch, precision, process count.

    python benchmarks/run.py                              # DDP, FSDP, FSDP + AC, ZeRO-2, ZeRO-3, TP; 38M GPT, 2 processes, 3 rounds
    python benchmarks/run.py --configs all --steps 10 --warmup 2   # every layout, each at its own processes and batch (about 1 hour)
    python benchmarks/run.py --configs dp_tp               # FSDP x TP: data 2 x tensor 2 on 4 processes
    python benchmarks/run.py --configs pp                  # 2 pipeline stages (2 processes only), 4 micro-batches of 2
    python benchmarks/run.py --configs cp --seq-len 2048   # each sequence split over 2 processes
    python benchmarks/run.py --scaling 1 2 4               # and FSDP, ZeRO-3 alone at 1, 2, 4 processes
    python benchmarks/run.py --model small --steps 6 --rounds 2   # a tiny model: a smoke test of the harness
    python benchmarks/run.py --model gpt1b --devices 1 --precision bf16-mixed --configs fsdp   # one GPU

A single pair of runs on a shared machine measures the machine's load as much as either side:
step times there move by a second on 4-6 s steps. So each configuration runs ``--rounds`` rounds
of one reference run and one shardtrain run, the order swapped every other round (reference
first, then shardtrain first, ...) so that drift in the machine's load falls on both sides. Each
round gives a pair of figures and their ratio, shardtrain / reference; the report is the median
of those ratios with their range (min-max), beside the median of each side's own figures. The
targets, a tokens/s ratio of at least 0.98 and a memory ratio of at most 1.05, are marked per row.

For each side the figures are: tokens/s, model FLOP/s and MFU, median step time and spread,
peak memory per rank (RSS on CPU, max_memory_allocated on CUDA). MFU is measured against a
stated peak: the datasheet figure of a known GPU, or on CPU a matmul measured at the start of
this run in as many processes as train. Results go to ``<out>/results.json`` (every round's raw
figures under ``configs.<name>.rounds``) and ``<out>/benchmark.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from summary import SIDES, pair, print_report, summarise  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """One layout: the reference script with its flags, shardtrain's flags, and what the layout
    needs of the run when ``--devices``/``--batch-size`` are not given (``None``: the run's default)."""

    reference: list[str]
    shardtrain: list[str]
    devices: int | None = None
    batch_size: int | None = None


CONFIGS = {
    "ddp": Config(["reference_ddp.py"], ["--strategy", "ddp"]),
    "fsdp": Config(["reference_fsdp.py"], ["--strategy", "fsdp"]),
    "fsdp_ac": Config(
        ["reference_fsdp.py", "--activation-checkpointing"],
        ["--strategy", "fsdp", "--activation-checkpointing"],
    ),
    "zero2": Config(["reference_deepspeed.py", "--stage", "2"], ["--strategy", "deepspeed", "--stage", "2"]),
    "zero3": Config(["reference_deepspeed.py", "--stage", "3"], ["--strategy", "deepspeed", "--stage", "3"]),
    # Tensor parallel in groups of 2: TP alone on 2 processes; data 2 x tensor 2 on 4.
    "tp": Config(
        ["reference_tp.py", "--tensor-parallel", "2"], ["--strategy", "model_parallel", "--tensor-parallel", "2"]
    ),
    "dp_tp": Config(
        ["reference_tp.py", "--tensor-parallel", "2"],
        ["--strategy", "model_parallel", "--tensor-parallel", "2"],
        devices=4,
    ),
    # Each sequence split over 2 ranks (PyTorch's ring attention): context 2 on 2 processes, data 2 x context 2 on 4.
    "cp": Config(
        ["reference_cp.py", "--context-parallel", "2"],
        ["--strategy", "model_parallel", "--context-parallel", "2"],
    ),
    # Two pipeline stages, one per process (1F1B, 4 micro-batches of 2 sequences), 2 processes only.
    "pp": Config(
        ["reference_pp.py", "--pipeline-parallel", "2", "--microbatches", "4"],
        ["--strategy", "model_parallel", "--pipeline-parallel", "2", "--microbatches", "4"],
        devices=2,
        batch_size=8,
    ),
}
#: ``--configs all``: every layout above, each at its own process count and batch.
ALL = "all"

DEFAULT_DEVICES = 2
DEFAULT_BATCH_SIZE = 4


def layout(config: Config, devices: int | None, batch_size: int | None) -> tuple[int, int]:
    """(processes, sequences per process) of one layout: what the command line gave, else the
    layout's own, else the defaults."""
    return (
        devices or config.devices or DEFAULT_DEVICES,
        batch_size or config.batch_size or DEFAULT_BATCH_SIZE,
    )


#: MALLOC_MMAP_THRESHOLD_ pins glibc's threshold, so that CPU RSS tracks live tensors rather than
#: what glibc keeps of freed ones (which depends on the order of allocations, not on the program).
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(extra: dict[str, str]) -> dict[str, str]:
    """Both sides' environment: one thread per process unless set, this checkout's examples and
    benchmarks first on the path (a PYTHONPATH already set is kept after them), no launcher layout."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")) if p),
        **extra,
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(command: list[str], out: Path, extra_env: dict[str, str]) -> dict:
    for stale in out.glob("rank*.json"):
        stale.unlink()
    subprocess.run(command, env=environment(extra_env), cwd=ROOT, check=True)
    results = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    summary = {
        "tokens_per_sec": results[0]["tokens_per_sec"],
        "step_time_median": results[0]["step_time_median"],
        "step_time_spread": results[0]["step_time_spread"],
        "peak_memory_per_rank_bytes": max(r["peak_memory_bytes"] for r in results),
        "ranks": len(results),
    }
    for key in ("monitor", "monitor_flops_per_batch", "monitor_peak_flops", "monitor_peak_source", "deepspeed_config"):
        if key in results[0]:
            summary[key] = results[0][key]
    return summary


def model_flops_per_token(model: str, seq_len: int | None = None) -> float:
    """Training FLOPs per token of the benchmark model, counted on the meta device (nothing allocated)."""
    import torch
    import torch.nn.functional as F

    from common import MODELS
    from examples.gpt.model import GPT
    from shardtrain.flops import count_training_flops

    config = MODELS[model] if seq_len is None else dataclasses.replace(MODELS[model], seq_len=seq_len)
    with torch.device("meta"):
        gpt = GPT(config)
        tokens = torch.zeros(1, config.seq_len, dtype=torch.long)
    flops = count_training_flops(lambda: F.cross_entropy(gpt(tokens).flatten(0, 1).float(), tokens.flatten()))
    return flops.model / config.seq_len


def device_peak_flops(devices: int, precision: str, extra_env: dict[str, str]) -> tuple[float, str]:
    """Peak FLOP/s of one device: the datasheet for a known GPU; on CPU a matmul measured in
    ``devices`` processes at once (each with the threads a training process has)."""
    probe = (
        "import torch; from shardtrain.flops import peak_flops; "
        "d = torch.device('cuda' if torch.cuda.is_available() else 'cpu'); "
        f"p, s = peak_flops(d, {'torch.bfloat16' if precision == 'bf16-mixed' else 'torch.float32'}); print(p, '|', s)"
    )
    env = environment(extra_env)
    procs = [
        subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(1 if _has_cuda() else devices)
    ]
    outputs = [p.communicate()[0].strip().rsplit("\n", 1)[-1] for p in procs]
    values = [float(o.split("|")[0]) for o in outputs]
    return statistics.median(values), outputs[0].split("|", 1)[1].strip()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def reference_command(name: str, devices: int, out: Path, common: list[str]) -> list[str]:
    script, *flags = CONFIGS[name].reference
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={devices}",
        f"--master-port={free_port()}",
        str(HERE / script),
        *flags,
        "--out",
        str(out),
        *common,
    ]


def shardtrain_command(name: str, devices: int, out: Path, common: list[str]) -> list[str]:
    return [
        sys.executable,
        str(HERE / "shardtrain_trainer.py"),
        *CONFIGS[name].shardtrain,
        "--monitor",
        "--devices",
        str(devices),
        "--out",
        str(out),
        *common,
    ]


def add_efficiency(side: dict, flops_per_token: float, peak: float) -> None:
    side["model_flops_per_sec"] = side["tokens_per_sec"] * flops_per_token
    side["mfu"] = side["model_flops_per_sec"] / (side["ranks"] * peak)


def run_round(name: str, index: int, rounds: int, devices: int, out: Path, common: list[str], extra_env: dict) -> dict:
    """One reference run and one shardtrain run of ``name``: the reference first in even rounds,
    shardtrain first in odd ones, so that a machine getting busier or quieter favours neither."""
    where = out / name / f"round{index}"
    commands = {
        "reference": reference_command(name, devices, where / "reference", common),
        "shardtrain": shardtrain_command(name, devices, where / "shardtrain", common),
    }
    order = SIDES if index % 2 == 0 else SIDES[::-1]
    figures = {}
    for side in order:
        print(f"[benchmark] {name}, round {index + 1} of {rounds}: {side}", flush=True)
        figures[side] = run(commands[side], where / side, extra_env)
    return {"order": order, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[n for n in CONFIGS if CONFIGS[n].devices is None and CONFIGS[n].batch_size is None],
        choices=[*CONFIGS, ALL],
        help=f"layouts to run; '{ALL}': every one, each at its own process count and batch",
    )
    parser.add_argument(
        "--devices", type=int, default=None, help=f"processes (default: the layout's own, else {DEFAULT_DEVICES})"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", default="gpt38m", choices=["small", "gpt38m", "gpt1b"])
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"sequences per process per step (default: the layout's own, else {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="the model's sequence length (default: its own)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="pairs of runs per configuration, in alternating order; the ratios reported are their median",
    )
    parser.add_argument(
        "--scaling", type=int, nargs="*", default=[], help="also run shardtrain alone at these process counts"
    )
    parser.add_argument(
        "--scaling-configs",
        nargs="+",
        default=["fsdp", "zero3"],
        choices=list(CONFIGS),
        help="the configurations --scaling runs",
    )
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds dynamic (CPU RSS then varies between identical runs)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    configs = list(CONFIGS) if ALL in args.configs else list(dict.fromkeys(args.configs))
    layouts = {name: layout(CONFIGS[name], args.devices, args.batch_size) for name in configs}
    extra_env = {} if args.default_malloc else PINNED_MALLOC
    out = Path(args.out)
    common = [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--model",
        args.model,
        "--precision",
        args.precision,
        *(["--seq-len", str(args.seq_len)] if args.seq_len else []),
    ]

    flops_per_token = model_flops_per_token(args.model, args.seq_len)
    # The peak per device depends on how many processes share the machine's cores: measured once per count.
    devices_used = sorted({devices for devices, _ in layouts.values()} | {args.devices or DEFAULT_DEVICES})
    peaks = {devices: device_peak_flops(devices, args.precision, extra_env) for devices in devices_used}
    peak, peak_source = peaks[args.devices or DEFAULT_DEVICES]
    report: dict = {
        "model": args.model,
        "devices": args.devices or DEFAULT_DEVICES,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "batch_size_per_rank": args.batch_size or DEFAULT_BATCH_SIZE,
        "seq_len": args.seq_len,
        "precision": args.precision,
        "malloc": "default" if args.default_malloc else "pinned",
        "model_flops_per_token": flops_per_token,
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "configs": {},
        "scaling": {},
    }
    started = time.monotonic()
    for name in configs:
        devices, batch_size = layouts[name]
        flags = [*common, "--batch-size", str(batch_size)]
        rounds = []
        for index in range(args.rounds):
            figures = run_round(name, index, args.rounds, devices, out, flags, extra_env)
            for side in SIDES:
                add_efficiency(figures[side], flops_per_token, peaks[devices][0])
            rounds.append(pair(figures["reference"], figures["shardtrain"], figures["order"]))
        report["configs"][name] = {"devices": devices, "batch_size_per_rank": batch_size, **summarise(rounds)}
    for name in args.scaling_configs if args.scaling else []:
        report["scaling"][name] = {}
        for devices in args.scaling:
            where = out / "scaling" / name / str(devices)
            flags = [*common, "--batch-size", str(layout(CONFIGS[name], devices, args.batch_size)[1])]
            result = run(shardtrain_command(name, devices, where, flags), where, extra_env)
            add_efficiency(result, flops_per_token, peak)
            report["scaling"][name][str(devices)] = result
    report["wall_seconds"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    from chart import write_chart

    chart = write_chart(report, out / "benchmark.png")
    print(f"results: {out / 'results.json'}" + (f", chart: {chart}" if chart else ""))


if __name__ == "__main__":
    main()
