"""LoRA against full fine-tuning of a pretrained Hugging Face Llama under FSDP, in the same run.

    python benchmarks/hf_lora.py --layers 2 --steps 4 --out /tmp/hf_lora_2l.json   # a quick check
    python benchmarks/hf_lora.py --out runs/hf_lora_1b.json                         # 1.03B parameters
    python benchmarks/hf_lora.py --accelerator cuda --devices 1 --precision bf16-mixed --batch-size 8 --seq-len 1024

The model is ``hf_load.py``'s (TinyLlama's shape, random weights, saved in bf16, made once in
``--model-dir``). Each way runs in its own fresh process group (``Trainer(devices=2,
strategy="fsdp")``, CPU, gloo, fp32 by default; ``--accelerator``, ``--devices``, ``--precision``), alternating ``full``, ``lora``, ``lora_bf16_base``, ``full``... for
``--rounds`` rounds, with the same data (random tokens, ``--batch-size`` sequences of ``--seq-len`` per
rank), both through ``shardtrain.hf.CausalLM`` (AdamW over the trainable parameters):

* ``full``: every weight trains.
* ``lora``: ``lora={r: 16, lora_alpha: 32, target_modules: [q,k,v,o,gate,up,down]_proj}``.
* ``lora_bf16_base``: the same with ``frozen_dtype="bf16"`` (the base kept in bf16, the adapters in fp32).

Per way, per rank: peak memory at the end (resident, ``ru_maxrss``, on CPU; ``max_memory_allocated`` on
CUDA), tokens/s over the steps after
``--warmup``; then the bytes of a whole checkpoint, and for LoRA of an adapter-only one
(``trainable_only=True``). Printed: each figure, and LoRA's over full's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "src"),
]  # shardtrain from the checkout where it is not installed (the GPU machine)
GIB = 2**30
WAYS = ("full", "lora", "lora_bf16_base")
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def worker(args: argparse.Namespace) -> None:
    """One way, in the process group the Trainer starts (this script runs again on each rank)."""
    from torch.utils.data import DataLoader

    from shardtrain import Callback, Trainer
    from shardtrain.hf import CausalLM

    class Clock(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter())

    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    rows = max(64, args.steps * args.batch_size * args.devices)
    blocks = torch.randint(0, vocab, (rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in blocks]
    clock = Clock()
    out = Path(args.run_dir)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="fsdp",
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        callbacks=[clock],
    )
    lora = args.worker.startswith("lora")
    module = CausalLM(
        args.model_dir,
        learning_rate=1e-4,
        lora=LORA if lora else None,
        frozen_dtype="bf16" if args.worker == "lora_bf16_base" else None,
    )
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size))
    timed = clock.times[args.warmup - 1 :]
    tokens = (len(timed) - 1) * args.batch_size * args.seq_len * trainer.world_size
    if args.accelerator == "cuda":
        peak = torch.cuda.max_memory_allocated() / GIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    figures = {
        "peak_rss_gib": peak,
        "tokens_per_sec": tokens / (timed[-1] - timed[0]),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),  # DTensors: global numel
    }
    trainer.save_checkpoint(out / "whole")
    if lora:
        trainer.save_checkpoint(out / "adapters_only", trainable_only=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--model-dir", default=None, help="default: runs/hf_lora_bench/llama_<layers>l")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=None, help="a JSON file for the figures")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision, e.g. bf16-mixed")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="which ways to run")
    parser.add_argument("--worker", choices=WAYS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from benchmarks.hf_load import ensure_checkpoint

    model_dir = Path(args.model_dir or ROOT / "runs" / "hf_lora_bench" / f"llama_{args.layers}l")
    parameters = ensure_checkpoint(model_dir, args.layers)
    work = model_dir.parent / "runs"
    results: dict[str, list[dict]] = {way: [] for way in args.ways}
    for round_index in range(args.rounds):
        for way in args.ways:
            run_dir = work / f"{way}{round_index}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            command = [
                sys.executable,
                __file__,
                "--worker",
                way,
                "--run-dir",
                str(run_dir),
                "--model-dir",
                str(model_dir),
            ]
            for name in ("steps", "warmup", "batch_size", "seq_len", "accelerator", "devices", "precision"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            subprocess.run(command, check=True, env=env)
            ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(args.devices)]
            row = {
                "peak_rss_gib": max(r["peak_rss_gib"] for r in ranks),
                "tokens_per_sec": ranks[0]["tokens_per_sec"],
                "trainable": ranks[0]["trainable"],
                "checkpoint_bytes": _bytes(run_dir / "whole"),
            }
            if way.startswith("lora"):
                row["adapter_checkpoint_bytes"] = _bytes(run_dir / "adapters_only")
            results[way].append(row)
            print(f"round {round_index} {way}: {json.dumps(row)}", flush=True)

    def median(way: str, key: str) -> float:
        return statistics.median(row[key] for row in results[way])

    summary = {
        "parameters": parameters,
        "layers": args.layers,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch_size_per_rank": args.batch_size,
        "accelerator": args.accelerator,
        "devices": args.devices,
        "precision": args.precision,
        "peak_memory": "max_memory_allocated" if args.accelerator == "cuda" else "ru_maxrss",
        **{f"{way}_{key}": median(way, key) for way in results for key in results[way][0]},
    }
    if "full" in results:  # each LoRA way over full fine-tuning
        for way in (w for w in results if w != "full"):
            summary[f"{way}_over_full_peak_rss"] = summary[f"{way}_peak_rss_gib"] / summary["full_peak_rss_gib"]
            summary[f"{way}_over_full_tokens_per_sec"] = (
                summary[f"{way}_tokens_per_sec"] / summary["full_tokens_per_sec"]
            )
            summary[f"{way}_adapter_checkpoint_over_full"] = (
                summary[f"{way}_adapter_checkpoint_bytes"] / summary["full_checkpoint_bytes"]
            )
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "rounds": results}, indent=2))


if __name__ == "__main__":
    main()
