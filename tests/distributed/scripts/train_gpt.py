"""Train a tiny GPT with the Trainer and write the per-step losses (reduced over ranks) as JSON.

Used by the parity tests: the same global batch through 1 process or N, with or without
accumulation, must give the same losses.
"""

import argparse
import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from shardtrain.strategies import DeepSpeedStrategy, create_strategy

from examples.gpt.data import corpus_splits
from examples.gpt.model import GPTConfig
from examples.gpt.model import GPTModule as ExampleGPTModule
import shardtrain
from shardtrain import Callback, ModelCheckpoint, ModelParallelStrategy, Preemption, ThroughputMonitor, Trainer


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.step is not None and trainer.global_step >= self.step:
            trainer.should_stop = True


class KillInSave(Callback):
    """Rank 1 kills itself (SIGKILL) once its shard file of the checkpoint being saved appears."""

    def __init__(self, step):
        self.step = step

    def on_save_checkpoint(self, trainer, module, checkpoint):
        if trainer.global_rank != 1 or trainer.global_step != self.step:
            return
        staging = trainer.checkpoint_dir / f".step={self.step}.partial"

        def kill_when_writing():
            while not any(staging.glob("__1_*.distcp")):
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=kill_when_writing, daemon=True).start()


class SendSignal(Callback):
    """At the end of a step, send a real signal to this process (as a scheduler would) and note when."""

    def __init__(self, step, name, rank, out):
        self.step, self.name, self.rank, self.out = step, name, rank, out

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # under torchrun --max-restarts

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero:
            (Path(self.out) / f"train_start_attempt{self.attempt}.json").write_text(
                json.dumps({"time": time.time(), "step": trainer.global_step})
            )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (
            self.step is not None
            and trainer.global_step == self.step
            and trainer.global_rank == self.rank
            and self.attempt == 0
        ):
            (Path(self.out) / "signal_sent.json").write_text(
                json.dumps({"time": time.time(), "step": self.step, "rank": self.rank})
            )
            os.kill(os.getpid(), getattr(signal, self.name))


class DumpWeights(Callback):
    """The full weights as the training processes hold them (an independent path from checkpoints)."""

    def __init__(self, when, out):
        self.when, self.out = when, out

    def _dump(self, trainer, module):
        from safetensors.torch import save_file

        if isinstance(trainer.strategy, DeepSpeedStrategy):  # DeepSpeed: whole weights through the strategy
            full = {name: t.contiguous() for name, t in trainer.strategy.module_state_dict(module, full=True).items()}
        else:
            full = {
                name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone().contiguous()
                for name, t in module.state_dict().items()
            }
        if trainer.is_global_zero:
            save_file(full, str(Path(self.out) / f"weights_{self.when}.safetensors"))

    def on_train_start(self, trainer, module):
        if self.when == "start":
            self._dump(trainer, module)

    def on_train_end(self, trainer, module):
        if self.when == "end":
            self._dump(trainer, module)


class WatchDir(Callback):
    """The most bytes seen in files under a directory during training (DeepSpeed's disk swap files)."""

    def __init__(self, directory):
        self.directory, self.most = directory, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.directory:
            self.most = max(self.most, sum(f.stat().st_size for f in Path(self.directory).rglob("*") if f.is_file()))


class GradNormRecorder(Callback):
    def __init__(self) -> None:
        self.norms = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [
            (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().flatten()
            for p in module.parameters()
            if p.grad is not None
        ]
        if grads:  # under DeepSpeed, ZeRO holds the gradients in its own buffers
            self.norms.append(torch.cat(grads).norm().item())


class GPTModule(ExampleGPTModule):
    """The example's module, recording the token positions its first training and validation steps saw (per rank: a
    file each), which under context parallelism are this rank's chunks of the sequence. Validation also logs the loss
    unsynced (``val_loss_rank``: each rank's own, which under context parallelism combines the sequence's parts)."""

    seen: list[int] | None = None
    seen_in_validation: list[int] | None = None

    def training_step(self, batch, batch_idx):
        if self.seen is None:
            self.seen = shardtrain.sequence_positions(batch[0].shape[1]).tolist()
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if self.seen_in_validation is None:
            self.seen_in_validation = shardtrain.sequence_positions(batch[0].shape[1]).tolist()
        super().validation_step(batch, batch_idx)
        self.log("val_loss_rank", self._pipeline_contract_loss(batch))


class SelfParallelGPT(GPTModule):
    """Lightning's contract: configure_model() splits the blocks' layers itself, from self.device_mesh
    (embeddings and the output layer stay whole), so the strategy applies no plan of its own."""

    def configure_model(self):
        super().configure_model()
        mesh = self.device_mesh
        if mesh is None or "tp" not in mesh.mesh_dim_names:
            return
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        for block in self.model.blocks:
            plan = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel()}
            plan |= {"mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()}
            parallelize_module(block, mesh["tp"], plan)


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--strategy", default="auto")
parser.add_argument("--batch-size", type=int, default=8, help="per process")
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--max-steps", type=int, default=10)
parser.add_argument("--clip", type=float, default=None)
parser.add_argument("--clip-algorithm", default="norm")
parser.add_argument("--precision", default="32-true")
parser.add_argument("--val-check-interval", type=int, default=None)
parser.add_argument("--seed", type=int, default=1234)
parser.add_argument("--ckpt-path", default=None)
parser.add_argument("--save-at-end", action="store_true")
parser.add_argument("--stop-at", type=int, default=None, help="stop (as if preempted) after this many steps")
parser.add_argument("--checkpoint-every", type=int, default=None)
parser.add_argument(
    "--dump-weights",
    choices=["start", "end"],
    default=None,
    help="write the full weights to weights_<when>.safetensors",
)
parser.add_argument(
    "--kill-in-save", type=int, default=None, help="rank 1 SIGKILLs itself in the middle of the save at this step"
)
parser.add_argument("--strategy-options", default="{}", help="JSON dict of strategy options")
parser.add_argument("--d-model", type=int, default=64)
parser.add_argument("--seq-len", type=int, default=32)
parser.add_argument("--experts", type=int, default=0, help="a mixture of experts in each block (GPTConfig.n_experts)")
parser.add_argument("--top-k", type=int, default=2)
parser.add_argument("--shared-expert", action="store_true")
parser.add_argument("--sample-bytes", type=int, default=0, help="after fit, greedily continue a 3-byte prompt")
parser.add_argument("--self-parallel", action="store_true", help="a module that applies tensor parallelism itself")
parser.add_argument("--watch-dir", default=None, help="record the most bytes held in files under this directory")
parser.add_argument(
    "--d-model-on-rank-1", type=int, default=None, help="rank 1 builds a model of this width (a config mismatch)"
)
parser.add_argument(
    "--signal-at-step", type=int, default=None, help="send --signal to rank --signal-rank at the end of this step"
)
parser.add_argument("--send-signal", default="SIGTERM")
parser.add_argument("--signal-rank", type=int, default=0)
parser.add_argument("--log-every", type=int, default=1)
parser.add_argument("--preemption", default="{}", help="JSON options of shardtrain.Preemption, or 'off'")
parser.add_argument(
    "--throughput-monitor", action="store_true", help="train with a ThroughputMonitor (its figures go to metrics.csv)"
)
args = parser.parse_args()

mismatched = args.d_model_on_rank_1 is not None and os.environ.get("RANK") == "1"
config = GPTConfig(
    n_layer=2,
    n_head=2,
    d_model=args.d_model_on_rank_1 if mismatched else args.d_model,
    seq_len=args.seq_len,
    n_experts=args.experts,
    top_k=args.top_k,
    shared_expert=args.shared_expert,
)
train, val = corpus_splits(config.seq_len)
train = torch.utils.data.Subset(train, range(2048))
recorder = GradNormRecorder()
watcher = WatchDir(args.watch_dir)
monitor = ThroughputMonitor() if args.throughput_monitor else None
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=create_strategy(args.strategy, **json.loads(args.strategy_options)) if args.strategy != "auto" else "auto",
    precision=args.precision,
    max_steps=args.max_steps,
    accumulate_grad_batches=args.accumulate,
    gradient_clip_val=args.clip,
    gradient_clip_algorithm=args.clip_algorithm,
    val_check_interval=args.val_check_interval,
    limit_val_batches=4,
    log_every_n_steps=args.log_every,
    default_root_dir=args.out,
    seed=args.seed,
    preemption=False if args.preemption == "off" else Preemption(**json.loads(args.preemption)),
    callbacks=[
        recorder,
        watcher,
        StopAt(args.stop_at),
        KillInSave(args.kill_in_save),
        DumpWeights(args.dump_weights, args.out),
        SendSignal(args.signal_at_step, args.send_signal, args.signal_rank, args.out),
    ]
    + ([ModelCheckpoint(every_n_train_steps=args.checkpoint_every, save_top_k=-1)] if args.checkpoint_every else [])
    + ([monitor] if monitor else []),
    enable_progress_bar=False,
)
module = (SelfParallelGPT if args.self_parallel else GPTModule)(config, learning_rate=3e-3, warmup_steps=3)
trainer.fit(
    module,
    DataLoader(train, batch_size=args.batch_size, shuffle=True),
    DataLoader(val, batch_size=args.batch_size) if args.val_check_interval else None,
    ckpt_path=args.ckpt_path,
)
if args.save_at_end:
    trainer.save_checkpoint()
sample = module.generate(b"The", args.sample_bytes, temperature=0) if args.sample_bytes else b""
if isinstance(trainer.strategy, DeepSpeedStrategy):  # DeepSpeed: whole weights through the strategy (collective)
    weights = trainer.strategy.module_state_dict(module, full=True)
    checksum = sum(weights[name].double().sum().item() for name, _ in module.named_parameters())
else:
    checksum = sum(
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().sum().item()
        for p in module.parameters()
    )
logits_layout = None
if isinstance(trainer.strategy, ModelParallelStrategy):  # one forward as a step runs it (every rank: collectives)
    with torch.no_grad():
        logits = trainer.model(torch.zeros(1, config.seq_len, dtype=torch.long))
    logits_layout = [str(p) for p in logits.placements] if hasattr(logits, "placements") else "whole"
(Path(args.out) / f"positions_rank{trainer.global_rank}.json").write_text(json.dumps(module.seen))
(Path(args.out) / f"val_positions_rank{trainer.global_rank}.json").write_text(json.dumps(module.seen_in_validation))
if trainer.is_global_zero:
    rows = list(csv.DictReader(open(Path(args.out) / "metrics.csv")))
    markers = [index for index, row in enumerate(rows) if row.get("resumed_from_step")]
    rows = rows[markers[-1] + 1 :] if markers else rows  # a resumed run appends after a marker: its own rows
    # Rows are at Lightning's step (the batches that stepped before the row's batch): +1 is the optimizer step.
    losses = {int(r["step"]) + 1: float(r["train_loss"]) for r in rows if r.get("train_loss")}
    val_losses = {int(r["step"]) + 1: float(r["val_loss"]) for r in rows if r.get("val_loss")}
    val_losses_rank0 = {int(r["step"]) + 1: float(r["val_loss_rank"]) for r in rows if r.get("val_loss_rank")}
    experts = range(config.n_experts)
    result = {
        "moe_aux_losses": [float(r["moe_aux_loss"]) for r in rows if r.get("moe_aux_loss")],
        "moe_shares": [[float(r[f"moe_expert{e}_share"]) for e in experts] for r in rows if r.get("moe_aux_loss")],
        "val_losses_rank0": val_losses_rank0,
        "losses": [losses[s] for s in sorted(losses)],
        "steps": sorted(losses),
        "val_losses": val_losses,
        "grad_norms_before_clip": recorder.norms,
        "grad_norm_logged": [float(r["train_grad_norm"]) for r in rows if r.get("train_grad_norm")],
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "weight_checksum": checksum,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "mesh": list(trainer.strategy.mesh().shape) if hasattr(trainer.strategy, "mesh") else None,
        "strategy": type(trainer.strategy).__name__,
        "zero_stage": getattr(trainer.strategy, "stage", None),
        "watched_bytes": watcher.most,
        "local_parameter_numel": sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() for p in dict(module.named_parameters()).values()
        ),
        "tied": module.model.head.weight is module.model.token_embedding.weight,
        "logits_layout": logits_layout,
        "sample": list(sample),
        "data_parallel_size": trainer.engine.data_parallel_size,
        "tensor_parallel_parameters": sorted(
            name
            for name, p in module.named_parameters()
            if "tp" in (getattr(p, "device_mesh", None) and p.device_mesh.mesh_dim_names or ())
        ),
        "parameters": config.num_parameters,
        "seq_len": config.seq_len,
        "flops_per_batch": monitor.flops_per_batch if monitor else None,
        "peak_flops": monitor.peak_flops if monitor else None,
        "throughput": [{k: float(v) for k, v in r.items() if k.startswith("throughput/") and v} for r in rows],
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result))
