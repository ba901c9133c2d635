"""Build (or load, when already built) the DeepSpeed C++ ops that runs on the CPU use; part of ``scripts/setup.sh``.

    python scripts/build_deepspeed_ops.py [--out DIR]

DeepSpeed compiles these on first use (several minutes on 2 cores, the first time on a machine). Built
inside a test they eat its timeout, and a build killed part-way leaves torch's lock file behind, on
which every later build waits for ever. The tests check ``missing_ops()`` and stop, naming this
script, when one is not built.
"""

import argparse
import json
import os
import time
from pathlib import Path

from deepspeed.accelerator import get_accelerator
from torch.utils.cpp_extension import get_default_build_root

#: Communication (every run on the CPU accelerator), CPU Adam (optimizer offload), async I/O and pinned
#: buffers (NVMe offload).
OPS = ("ShareMemCommBuilder", "CPUAdamBuilder", "AsyncIOBuilder", "PinMemoryBuilder")

#: A build takes minutes; a lock this old was left by a build that was killed.
STALE_LOCK_SECONDS = 30 * 60


def remove_stale_locks() -> list[str]:
    """Delete torch's build locks left behind by killed builds (they would block every later build)."""
    root = _build_root()
    removed = []
    for lock in root.glob("**/lock"):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
            removed.append(str(lock))
    return removed


def _build_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def missing_ops() -> list[str]:
    """The ops in ``OPS`` whose compiled library is not in torch's extension cache (nothing is built)."""
    missing = []
    for name in OPS:
        op = get_accelerator().create_op_builder(name)
        if op is None or not op.is_compatible(verbose=False):
            continue  # DeepSpeed cannot build it here at all; the tests that need it say so themselves
        root = _build_root()  # torch builds into <root>/py<version>_<cpu|cuXY>/<op>/
        if not any(root.glob(f"*/{op.name}/{op.name}.so")) and not (root / op.name / f"{op.name}.so").is_file():
            missing.append(op.name)
    return missing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="write the seconds per op to DIR/result.json")
    args = parser.parse_args()
    removed = remove_stale_locks()
    if removed:
        print(f"removed stale build locks left by killed builds: {removed}", flush=True)
    seconds = {}
    for name in OPS:
        start = time.perf_counter()
        get_accelerator().create_op_builder(name).load()
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"DeepSpeed op {name}: built or loaded in {seconds[name]} s", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(seconds))


if __name__ == "__main__":
    main()
