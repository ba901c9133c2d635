"""Run one Lightning-oracle module's ``experiment`` (``tests/lightning_port``) in one flavour, under torchrun;
each rank writes its records to ``rank<N>.json``.

    torchrun --nproc-per-node 2 lightning_port.py --out DIR --module basic --flavour shardtrain --strategy ddp
"""

import argparse
import json
import os
from pathlib import Path

from shardtrain.launch.process_group import destroy_process_group
from tests.lightning_port import run

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--module", required=True)
parser.add_argument("--flavour", required=True, choices=("lightning", "shardtrain"))
parser.add_argument("--strategy", required=True)
parser.add_argument("--kwargs", default="{}", help="more Trainer arguments, as JSON")
args = parser.parse_args()

rank = int(os.environ.get("RANK", 0))
root = Path(args.out) / args.flavour
records = run(
    args.module,
    args.flavour,
    root,
    strategy=args.strategy,
    devices=int(os.environ.get("WORLD_SIZE", 1)),
    **json.loads(args.kwargs),
)
Path(args.out).mkdir(parents=True, exist_ok=True)
(Path(args.out) / f"rank{rank}.json").write_text(json.dumps(records))

# Lightning leaves its gloo group to the interpreter's teardown, where a gloo worker thread that still needs the
# GIL aborts the process now and then ("terminate called without an active exception", SIGABRT: once in CI's
# full suite, after every rank had finished). Leave it as shardtrain's own runs do (see destroy_process_group).
destroy_process_group()
