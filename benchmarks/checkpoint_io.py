"""Checkpoint save/load time against the disk's own write bandwidth, measured in the same run.

    python benchmarks/checkpoint_io.py                 # ~200M-parameter GPT, FSDP over 2 processes

Prints: the disk's sequential write bandwidth (dd with fsync), bytes written against the
theoretical size (fp32 parameters + two AdamW moments), sync save time, async save time and how
long the training loop was blocked by it, and load time.

Then the cost of checksums (``shardtrain.checkpoint.integrity``), ``--rounds`` rounds alternating a save and
load with them and without them: sync save and load times, and the training steps' time while an async save
is being written against steps with no save in flight. "Without" runs the same code with the three checksum
functions replaced by no-ops in this process (there is no switch to turn checksums off).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.gpt.model import GPTConfig, GPTModule  # noqa: E402
from shardtrain import Engine  # noqa: E402


def disk_write_bandwidth(directory: Path, megabytes: int = 1024) -> float:
    """Bytes/s of one sequential write with fsync (dd conv=fsync)."""
    target = directory / "dd.bin"
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - start
    target.unlink()
    return megabytes * 2**20 / elapsed


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/checkpoint_io")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the checksum comparison")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed during each async save")
    args = parser.parse_args()
    out = Path(args.out)
    engine = Engine(accelerator="cpu", devices=2, strategy="fsdp")
    engine.launch()
    if engine.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    bandwidth = disk_write_bandwidth(out) if engine.is_global_zero else 0.0
    engine.barrier()
    engine.seed_everything(0)
    config = GPTConfig(n_layer=args.layers, d_model=args.width, n_head=16, seq_len=64)
    module = GPTModule(config)
    with engine.init_module():
        module.configure_model()
    model = engine.setup_module(module)
    optimizer = engine.setup_optimizers(torch.optim.AdamW(module.parameters(), lr=1e-4))[0]
    tokens = torch.randint(0, 256, (1, 65))
    step_times = []

    def step() -> None:
        start = time.perf_counter()
        engine.backward(model.training_step((tokens[:, :-1], tokens[:, 1:]), 0))
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - start)

    step()  # AdamW state exists from here on
    state = {"model": model, "optimizer": optimizer}
    timings = {}
    for name in ("sync", "async"):
        shutil.rmtree(out / name, ignore_errors=True)
    engine.barrier()
    start = time.perf_counter()
    engine.save(out / "sync", state)
    timings["sync_save_s"] = time.perf_counter() - start
    start = time.perf_counter()
    engine.save(out / "async", state, asynchronous=True)
    timings["async_blocked_s"] = time.perf_counter() - start
    step()  # the loop goes on while the files are written
    engine.wait_for_checkpoint()
    timings["async_total_s"] = time.perf_counter() - start
    start = time.perf_counter()
    engine.load(out / "sync", state)
    timings["load_s"] = time.perf_counter() - start
    if engine.is_global_zero:
        parameters = config.num_parameters
        theoretical = parameters * 4 * 3  # fp32 weights + exp_avg + exp_avg_sq
        written = directory_bytes(out / "sync")
        report = {
            "parameters": parameters,
            "disk_write_bandwidth_MBps": bandwidth / 1e6,
            "bytes_written": written,
            "bytes_theoretical": theoretical,
            "written_over_theoretical": written / theoretical,
            **timings,
            "sync_save_MBps": written / timings["sync_save_s"] / 1e6,
            "sync_save_over_disk_bandwidth": written / timings["sync_save_s"] / bandwidth,
            "training_step_s": step_times[0],
        }
    else:
        report = {}
    report.update(checksum_cost(engine, out, state, step, step_times, args.rounds, args.steps))
    if engine.is_global_zero:
        (out / "result.json").write_text(json.dumps(report, indent=1))
        for key, value in report.items():
            print(f"{key:40} {value:,.3f}" if isinstance(value, float) else f"{key:40} {value:,}")


def checksum_cost(
    engine: Engine, out: Path, state: dict, step: Any, step_times: list, rounds: int, steps: int
) -> dict[str, float]:
    """Median save/load times and step times during an async save, with and without checksums, alternating."""
    from shardtrain.checkpoint import sharded

    real = (sharded.record_rank_checksums, sharded.collect_checksums, sharded.verify_checkpoint)
    off = (lambda *a, **k: None, lambda *a, **k: {}, lambda *a, **k: None)
    figures: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    for _ in range(rounds):
        for mode, functions in (("with", real), ("without", off)):
            sharded.record_rank_checksums, sharded.collect_checksums, sharded.verify_checkpoint = functions
            sharded._verified.clear()
            target = out / f"checksums_{mode}"
            shutil.rmtree(target, ignore_errors=True)
            engine.barrier()
            start = time.perf_counter()
            engine.save(target, state)
            note(f"{mode}_checksums_sync_save_s", time.perf_counter() - start)
            engine.barrier()
            start = time.perf_counter()
            engine.load(target, state)
            note(f"{mode}_checksums_load_s", time.perf_counter() - start)
            del step_times[:]
            for _ in range(steps):  # no save in flight
                step()
            note(f"{mode}_checksums_step_s_no_save", statistics.median(step_times))
            del step_times[:]
            shutil.rmtree(target, ignore_errors=True)
            engine.barrier()
            engine.save(target, state, asynchronous=True)
            for _ in range(steps):  # while the files are written (and checksummed) in the background
                step()
            engine.wait_for_checkpoint()
            note(f"{mode}_checksums_step_s_during_async_save", statistics.median(step_times))
            engine.barrier()
    sharded.record_rank_checksums, sharded.collect_checksums, sharded.verify_checkpoint = real
    report = {name: statistics.median(values) for name, values in figures.items()}
    for what in ("sync_save_s", "load_s", "step_s_during_async_save"):
        report[f"checksums_{what}_with_over_without"] = (
            report[f"with_checksums_{what}"] / report[f"without_checksums_{what}"]
        )
    report["step_during_async_save_with_checksums_over_no_save"] = (
        report["with_checksums_step_s_during_async_save"] / report["with_checksums_step_s_no_save"]
    )
    return report


if __name__ == "__main__":
    main()
