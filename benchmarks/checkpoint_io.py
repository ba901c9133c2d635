"""Checkpoint save/load time against the disk's own write bandwidth, measured in the same run.

    python benchmarks/checkpoint_io.py                 # ~200M-parameter GPT, FSDP over 2 processes

Prints: the disk's sequential write bandwidth (dd with fsync), bytes written against the
theoretical size (fp32 parameters + two AdamW moments), sync save time, async save time and how
long the training loop was blocked by it, and load time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
        (out / "result.json").write_text(json.dumps(report, indent=1))
        for key, value in report.items():
            print(f"{key:32} {value:,.3f}" if isinstance(value, float) else f"{key:32} {value:,}")


if __name__ == "__main__":
    main()
