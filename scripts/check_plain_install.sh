#!/usr/bin/env bash
# The plain install runs on two processes: a fresh virtual environment with only
# `pip install torch==2.13.0 -e .` (no extras) trains the README's GPT example for 3 steps on
# 2 processes under ddp, fsdp, model_parallel (tensor parallel over both), model_parallel with two
# pipeline stages (examples/gpt/gpt_pipeline.yaml) and the mixture-of-experts GPT with its experts over
# both (examples/gpt/gpt_moe.yaml), and checks that shardtrain.hf without
# transformers names the extra to install. It catches a
# runtime dependency that only an extra brought in (numpy once did: torch's *_object
# collectives need it).
#
#   bash scripts/check_plain_install.sh
#
# SHARDTRAIN_TORCH: the torch requirement to install (default torch==2.13.0, the CPU wheel of
# development machines); set it empty to keep the torch that pip picks.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
unset PYTHONPATH VIRTUAL_ENV
torch_requirement=${SHARDTRAIN_TORCH-torch==2.13.0}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m venv "$work/venv"
echo "[plain install] pip install ${torch_requirement:+$torch_requirement }-e . (into $work/venv)"
"$work/venv/bin/python" -m pip install -q ${torch_requirement:+"$torch_requirement"} -e .

for strategy in ddp fsdp model_parallel pipeline experts; do
  echo "[plain install] shardtrain fit, GPT example, 2 processes, $strategy, 3 steps"
  start=$SECONDS
  if [ "$strategy" = pipeline ]; then  # model_parallel with 2 pipeline stages: the example's own config
    config=(--config examples/gpt/gpt_pipeline.yaml)
  elif [ "$strategy" = experts ]; then  # model_parallel with expert_parallel_size=2: the example's own config
    config=(--config examples/gpt/gpt_moe.yaml)
  else
    config=(--config examples/gpt/gpt.yaml --strategy.name "$strategy")
  fi
  "$work/venv/bin/shardtrain" fit "${config[@]}" \
    --trainer.max_steps 3 --trainer.limit_val_batches 0 --trainer.log_every_n_steps 1 \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$work/runs/$strategy"
  # The run must have trained, not only exited 0: the third step's loss is in the metrics.
  metrics="$work/runs/$strategy/metrics.csv"
  if ! "$work/venv/bin/python" - "$metrics" <<'PY'
import csv, math, sys
rows = [row for row in csv.DictReader(open(sys.argv[1])) if row.get("train_loss")]
steps = [int(row["step"]) for row in rows]  # Lightning's steps, from 0
assert steps and max(steps) == 2 and all(math.isfinite(float(row["train_loss"])) for row in rows), rows
PY
  then
    echo "[plain install] FAILED: $strategy did not log a finite loss at step 3 in $metrics" >&2
    exit 1
  fi
  echo "[plain install] $strategy: 3 steps in $((SECONDS - start)) s"
done
# The optional extras stay optional: without transformers, shardtrain.hf imports and its use names the extra.
if ! "$work/venv/bin/python" - <<'PY'
import shardtrain.hf
from shardtrain.errors import MissingDependencyError

try:
    shardtrain.hf.from_pretrained("any/model")
except MissingDependencyError as error:
    assert "pip install 'shardtrain[hf]'" in str(error), error
else:
    raise AssertionError("from_pretrained ran without transformers")
PY
then
  echo "[plain install] FAILED: shardtrain.hf without transformers did not name the hf extra" >&2
  exit 1
fi
echo "[plain install] shardtrain.hf without transformers: names the hf extra"
echo "[plain install] passed"
