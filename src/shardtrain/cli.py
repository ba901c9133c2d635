"""``shardtrain <command>``: thin commands over the library (parse, call, print).

Today: ``consolidate``. The run-config commands (``fit``, ``validate``, ``print-config``,
``estimate``) come with the configuration work.
"""

from __future__ import annotations

import argparse
import sys

from shardtrain.checkpoint.consolidate import consolidate, consolidate_optimizer
from shardtrain.errors import ShardtrainError


def _parse_size(text: str) -> int:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardtrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cons = commands.add_parser("consolidate", help="export a sharded checkpoint's model weights to safetensors")
    cons.add_argument("checkpoint", help="a checkpoint directory (e.g. runs/checkpoints/step=1000)")
    cons.add_argument("output", help="model.safetensors, or a directory for several files with an index")
    cons.add_argument("--key", default=None, help="which module of the checkpoint (default: its first)")
    cons.add_argument("--max-shard-size", default="5GiB", type=_parse_size, help="split into files of at most this size (default 5GiB)")
    cons.add_argument("--optimizer", default=None, metavar="FILE", help="also write the optimizer state tensors to this .safetensors file")
    args = parser.parse_args(argv)
    try:
        files = consolidate(args.checkpoint, args.output, key=args.key, max_shard_bytes=args.max_shard_size)
        if args.optimizer:
            files.append(consolidate_optimizer(args.checkpoint, args.optimizer))
    except ShardtrainError as error:
        print(f"shardtrain: {error}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
