"""Train the GPT example on the embedded corpus: the README's main job.

    python examples/gpt/train.py                      # 2 processes, FSDP (sharded), CPU or GPU
    python examples/gpt/train.py --devices 1 --max-steps 50
    torchrun --nproc-per-node 8 examples/gpt/train.py --devices 8 --precision bf16-mixed

Every option is a Trainer argument or a model size; the strategy is one word.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `examples` importable from a checkout

from examples.gpt.data import corpus_loaders  # noqa: E402
from examples.gpt.model import GPTConfig, GPTModule  # noqa: E402
from examples.gpt.sample import SampleText  # noqa: E402
from shardtrain import ModelCheckpoint, ThroughputMonitor, Trainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="fsdp")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--val-check-interval", type=int, default=100)
    parser.add_argument("--root-dir", default="runs/gpt")
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head)
    train_loader, val_loader = corpus_loaders(args.seq_len, args.batch_size)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_steps=args.max_steps,
        val_check_interval=args.val_check_interval,
        limit_val_batches=20,
        log_every_n_steps=10,
        gradient_clip_val=1.0,
        default_root_dir=args.root_dir,
        seed=args.seed,
        callbacks=[ThroughputMonitor(), ModelCheckpoint(every_n_train_steps=100), SampleText()],
    )
    trainer.engine.print(
        f"GPT with {config.num_parameters / 1e6:.1f}M parameters, {args.devices} process(es), strategy={args.strategy}, "
        f"global batch {args.batch_size * trainer.world_size} x {args.seq_len} tokens"
    )
    module = GPTModule(config, learning_rate=args.learning_rate)
    trainer.fit(module, train_loader, val_loader)
    metrics = trainer.callback_metrics
    trainer.engine.print(
        f"done: step {trainer.global_step}, train_loss {metrics['train_loss']:.3f}, val_loss {metrics.get('val_loss', float('nan')):.3f}; metrics in {trainer.default_root_dir / 'metrics.csv'}"
    )


if __name__ == "__main__":
    main()
