"""What one row of ``gpu_check.py`` runs, in its own process (world size 1).

    python benchmarks/gpu_check_rows.py train --out DIR --strategy fsdp --precision bf16-mixed ...
    python benchmarks/gpu_check_rows.py lightning --out DIR --model gpt1b --precision bf16-mixed ...

``train``: the GPT example through the Trainer for ``--steps`` steps, optionally saving a
synchronous and an asynchronous checkpoint at given steps, or resuming from one. It writes
``result.json``: every step's loss, and what the run was really on (device, process-group
backend, pinned offload, the RNG streams inside the checkpoints) so that ``gpu_check.py`` can
check that a CUDA row ran on CUDA rather than trust it.

``lightning``: the benchmark's third column, Lightning's Trainer with its ``FSDPStrategy`` on
the benchmark's model, data, batch and precision, timed like the other two sides
(``common.StepTimer``, ``common.write_result``). Lightning's FSDP refuses CPU, so this runs on a
GPU only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "src")]


# ---------------------------------------------------------------------------- train rows
def train_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check_rows.py train")
    parser.add_argument("--out", required=True)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--strategy", default="single")
    parser.add_argument("--strategy-options", default="{}", help="JSON dict of strategy options")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="{}", help="JSON dict of GPTConfig fields")
    parser.add_argument("--save-sync-at", type=int, default=None, help="save synchronously after this step")
    parser.add_argument("--save-async-at", type=int, default=None, help="save asynchronously after this step")
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint directory")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    return parser.parse_args(argv)


def train(argv: list[str]) -> None:
    from torch.utils.data import DataLoader, Subset

    from examples.gpt.data import corpus_splits
    from examples.gpt.model import GPTConfig, GPTModule
    from shardtrain import Callback, Trainer
    from shardtrain.strategies import create_strategy

    args = train_arguments(argv)
    if args.deterministic:
        # Both the uninterrupted and the resumed run pick the same kernels, so their losses can be
        # compared exactly (cuBLAS also needs CUBLAS_WORKSPACE_CONFIG, set by gpu_check.py).
        torch.use_deterministic_algorithms(True, warn_only=True)

    class Record(Callback):
        """Each step's loss (kept on the device until the end: no sync per step) and the saves."""

        def __init__(self) -> None:
            self.steps: list[int] = []
            self.losses: list[torch.Tensor] = []
            self.saved: dict[str, str] = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.steps.append(trainer.global_step)
            self.losses.append(outputs.detach().float())
            for kind, at in (("sync", args.save_sync_at), ("async", args.save_async_at)):
                if at == trainer.global_step:
                    path = trainer.checkpoint_dir / f"{kind}-step={at}"
                    self.saved[kind] = str(trainer.save_checkpoint(path, asynchronous=kind == "async"))

    config = GPTConfig(**json.loads(args.model))
    train_set, _ = corpus_splits(config.seq_len)
    train_set = Subset(train_set, range(min(len(train_set), args.steps * args.batch_size)))
    record = Record()
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=1,
        strategy=create_strategy(args.strategy, **json.loads(args.strategy_options)),
        precision=args.precision,
        max_steps=args.steps,
        gradient_clip_val=1.0,
        log_every_n_steps=args.steps,
        default_root_dir=args.out,
        seed=1234,
        callbacks=[record],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = GPTModule(config, learning_rate=3e-3, warmup_steps=3)
    start = time.perf_counter()
    trainer.fit(module, DataLoader(train_set, batch_size=args.batch_size, shuffle=False), ckpt_path=args.ckpt_path)
    seconds = time.perf_counter() - start
    losses = torch.stack(record.losses).tolist() if record.losses else []
    result = {
        "steps": record.steps,
        "losses": losses,
        "finite": all(math.isfinite(loss) for loss in losses),
        "seconds": seconds,
        "checkpoints": {kind: _checkpoint_facts(Path(path)) for kind, path in record.saved.items()},
        **_where_it_ran(trainer, module),
    }
    Path(args.out, "result.json").write_text(json.dumps(result, indent=1))


def _where_it_ran(trainer, module) -> dict:
    """Facts read from the run itself: the parameters' device, the process-group backend, pinning."""
    import torch.distributed as dist

    parameter = next(module.parameters())
    local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
    facts = {
        "strategy": type(trainer.strategy).__name__,
        "device": str(trainer.engine.device),
        "parameter_device": local.device.type,
        "parameter_pinned": bool(local.is_pinned())
        if local.device.type == "cpu" and torch.cuda.is_available()
        else None,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    return facts


def _checkpoint_facts(path: Path) -> dict:
    """Whether a checkpoint holds every RNG stream of this process (CUDA's included on a GPU)."""
    from shardtrain.checkpoint import saved_keys

    rng = sorted(key for key in saved_keys(path) if key.startswith("rng."))
    return {"path": str(path), "rng_keys": rng, "has_cuda_rng": any(".cuda" in key for key in rng)}


# ---------------------------------------------------------------------------- the Lightning column
def lightning(argv: list[str]) -> None:
    import lightning as L
    import torch.nn.functional as F
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.utils.data import DataLoader

    from common import MODELS, StepTimer, benchmark_arguments, dataset, write_result
    from examples.gpt.model import GPT, Block

    sys.argv = [sys.argv[0], *argv]
    args = benchmark_arguments()
    config = MODELS[args.model]

    class GPTLightning(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: GPT | None = None

        def configure_model(self) -> None:  # built on the GPU directly, as the other sides do
            if self.model is None:
                with torch.device(self.trainer.strategy.root_device):
                    self.model = GPT(config)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

        def configure_optimizers(self):  # as the references: AdamW, lr 3e-4, no schedule
            return torch.optim.AdamW(self.parameters(), lr=3e-4)

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            # Lightning's FSDP refuses gradient_clip_algorithm='norm'; FSDP's own clip_grad_norm_ is its answer.
            self.trainer.strategy.model.clip_grad_norm_(1.0)

    class Timing(L.Callback):
        def __init__(self) -> None:
            self.timer = StepTimer()

        def on_train_start(self, trainer, module):
            self.timer.tick()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.timer.tick()

    checkpointed = {Block} if args.activation_checkpointing else None
    timing = Timing()
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        strategy=FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy=checkpointed),
        precision=args.precision,
        max_steps=args.steps,
        callbacks=[timing],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(Path(args.out) / "logs"),
    )
    torch.manual_seed(0)
    loader = DataLoader(dataset(config), batch_size=args.batch_size, shuffle=False, drop_last=True)
    trainer.fit(GPTLightning(), loader)
    extra = {"lightning": L.__version__, "strategy": "lightning.pytorch.strategies.FSDPStrategy (FSDP1)"}
    write_result(
        Path(args.out), trainer.global_rank, timing.timer.times, args.warmup, args.batch_size * config.seq_len, extra
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kinds = {"train": train, "lightning": lightning}
    if len(sys.argv) < 2 or sys.argv[1] not in kinds:
        raise SystemExit(f"usage: gpu_check_rows.py {{{','.join(kinds)}}} [options]")
    kinds[sys.argv[1]](sys.argv[2:])
