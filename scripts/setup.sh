#!/usr/bin/env bash
# Set up a fresh development machine (Debian, Python >= 3.10): the system package the tests need,
# then shardtrain with its dev extra, into the Python that `python` runs (activate a virtual
# environment first to install there).
#
#   bash scripts/setup.sh
#
# SHARDTRAIN_TORCH: the torch requirement installed with shardtrain; default torch==2.13.0, the
# CPU wheel of development machines. On a GPU machine, install your CUDA torch first and run
# `SHARDTRAIN_TORCH= bash scripts/setup.sh` to keep it (any torch >= 2.6).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_requirement=${SHARDTRAIN_TORCH-torch==2.13.0}

# DeepSpeed's disk (NVMe) offload builds its async_io op against libaio's headers (Debian's
# libaio-dev); the tests run it.
if [ -e /usr/include/libaio.h ]; then
  :
elif ! command -v apt-get >/dev/null; then
  echo "setup: apt-get not found, so libaio's headers were not installed: install them yourself" \
    "(Fedora: libaio-devel); until then DeepSpeed's disk offload and its tests fail." >&2
elif [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
  echo "setup: not root and no sudo, so libaio-dev was not installed: run 'apt-get install libaio-dev'" \
    "as root; until then DeepSpeed's disk offload and its tests fail." >&2
else
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  echo "setup: apt-get install libaio-dev"
  "${sudo[@]}" apt-get install -y -q libaio-dev \
    || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q libaio-dev; }
fi

echo "setup: pip install ${torch_requirement:+$torch_requirement }-e .[dev]"
python -m pip install ${torch_requirement:+"$torch_requirement"} -e ".[dev]"

# DeepSpeed compiles its C++ ops (communication, CPU Adam, async I/O, pinned memory) on first use:
# minutes on 2 cores, once per machine. Build them here rather than inside the first test that runs
# DeepSpeed (the tests stop at once, naming this step, when they are missing).
if python -c "import deepspeed" >/dev/null 2>&1; then
  echo "setup: building DeepSpeed's ops (once per machine; seconds when already built)"
  python scripts/build_deepspeed_ops.py
fi
