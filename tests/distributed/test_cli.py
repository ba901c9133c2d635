"""`shardtrain fit` from a YAML file: the same run as in Python, resumable with no config file."""

import csv
import os
import subprocess
import sys

import pytest

from examples.gpt.model import GPTConfig
from tests.distributed.runner import ROOT, assert_ok, run_script

pytestmark = pytest.mark.distributed
CONFIG = ROOT / "tests" / "distributed" / "configs" / "tiny.yaml"


def _cli(*args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "shardtrain", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def _losses(directory):
    return {
        int(r["step"]) + 1: float(
            r["train_loss"]
        )  # rows at Lightning's step (batches before): +1 is the optimizer step
        for r in csv.DictReader(open(directory / "metrics.csv"))
        if r.get("train_loss")
    }


@pytest.mark.fast
def test_yaml_run_equals_python_run_and_resumes_without_a_config(tmp_path):
    out = _cli(
        "fit",
        "--config",
        CONFIG,
        "--trainer.default_root_dir",
        tmp_path / "cli",
        "--trainer.callbacks+",
        "examples.gpt.sample.SampleText",  # appended to the config's ModelCheckpoint; runs after training
        "--trainer.callbacks.length",
        "20",
    ).stdout
    # The summary before the first step: the global parameter count (each FSDP rank holds half), then the layout.
    assert (
        f"[shardtrain] GPTModule: {GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=32).num_parameters / 1e3:.2f}K parameters\n"
        in out
    )
    assert (
        "[shardtrain] FSDPStrategy(sharding_strategy='FULL_SHARD', cpu_offload=False) over 2 processes (cpu), precision 32-true"
        in out
    )
    assert (
        f"[shardtrain] logs: {tmp_path / 'cli' / 'metrics.csv'} (CSVLogger); checkpoints: {tmp_path / 'cli' / 'checkpoints'}/ (at the end)"
        in out
    )
    assert out.index("[shardtrain] GPTModule") < out.index(
        "sample after 5 steps:"
    )  # printed once, by rank 0, at the end
    sample = out.split("sample after 5 steps:\n", 1)[1]
    assert out.count("sample after") == 1 and sample.startswith("  | It is a truth universally acknowledged")
    assert len(sample.replace("  | ", "").rstrip("\n").encode()) >= len("It is a truth universally acknowledged") + 10
    assert_ok(run_script("python_equivalent.py", tmp_path / "python"))
    cli, python = _losses(tmp_path / "cli"), _losses(tmp_path / "python")
    assert sorted(cli) == [1, 2, 3, 4, 5]
    assert [cli[s] for s in sorted(cli)] == pytest.approx([python[s] for s in sorted(python)], abs=1e-6)
    assert (tmp_path / "cli" / "config.yaml").is_file()

    # No config file: the run config comes from the checkpoint; an override extends the run.
    _cli("fit", "--ckpt_path", tmp_path / "cli" / "checkpoints" / "last", "--trainer.max_steps", "8")
    resumed = _losses(tmp_path / "cli")  # appended to the same metrics.csv
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6, 7, 8] and {step: resumed[step] for step in cli} == cli


def test_a_tensor_parallel_yaml_run_with_its_plan_equals_the_fsdp_run(tmp_path):
    tensor_parallel = ROOT / "tests" / "distributed" / "configs" / "tensor_parallel.yaml"
    out = _cli("fit", "--config", tensor_parallel, "--trainer.default_root_dir", tmp_path / "tp").stdout
    assert "ModelParallelStrategy(data_parallel_size='auto', tensor_parallel_size=2) over 2 processes" in out
    _cli("fit", "--config", CONFIG, "--trainer.default_root_dir", tmp_path / "fsdp", "--trainer.callbacks", "[]")
    tp, fsdp = _losses(tmp_path / "tp"), _losses(tmp_path / "fsdp")
    assert sorted(tp) == [1, 2, 3, 4, 5]
    assert [tp[s] for s in sorted(tp)] == pytest.approx([fsdp[s] for s in sorted(fsdp)], abs=1e-5)


def test_the_gpt_example_s_pipeline_config_trains_and_validates_as_fsdp_does(tmp_path):
    """examples/gpt/gpt_pipeline.yaml, shrunk to 4 steps of a small model (4 blocks of width 32, sequences
    of 32): the same training and validation losses as the same config under FSDP."""
    pipeline = ROOT / "examples" / "gpt" / "gpt_pipeline.yaml"
    small = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2"]
    small += ["--trainer.log_every_n_steps", "1", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false"]
    small += ["--model.init_args.config", "{n_layer: 4, n_head: 2, d_model: 32, seq_len: 32}"]
    small += ["--data.init_args.seq_len", "32", "--data.init_args.shuffle", "true"]
    out = _cli("fit", "--config", pipeline, *small, "--trainer.default_root_dir", tmp_path / "pp").stdout
    assert "pipeline_parallel_size=2, pipeline_schedule='1f1b') over 2 processes" in out
    assert "parameters on rank 0, which holds only its own pipeline stages" in out
    _cli(
        "fit",
        "--config",
        pipeline,
        *small,
        "--strategy",
        "{name: fsdp}",
        "--data.init_args.batch_size",  # 2 data-parallel ranks x 4: the 8 the pipeline reads as one batch
        "4",
        "--trainer.default_root_dir",
        tmp_path / "fsdp",
    )
    pp, fsdp = _losses(tmp_path / "pp"), _losses(tmp_path / "fsdp")
    assert sorted(pp) == [1, 2, 3, 4]
    assert [pp[s] for s in sorted(pp)] == pytest.approx([fsdp[s] for s in sorted(fsdp)], abs=1e-5)
    val = [
        [float(r["val_loss"]) for r in csv.DictReader(open(d / "metrics.csv")) if r.get("val_loss")]
        for d in (tmp_path / "pp", tmp_path / "fsdp")
    ]
    assert len(val[0]) == 1 and val[0] == pytest.approx(val[1], abs=1e-5)


def test_the_gpt_example_s_mixture_of_experts_config_trains_as_fsdp_does_and_logs_the_routers(tmp_path):
    """examples/gpt/gpt_moe.yaml (experts over 2 processes), shrunk to 4 steps of a small model: the same losses as
    the same config under FSDP, with the routers' balance loss and each expert's share of the tokens logged."""
    moe = ROOT / "examples" / "gpt" / "gpt_moe.yaml"
    small = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2"]
    small += ["--trainer.log_every_n_steps", "1", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false"]
    small += ["--model.init_args.config", "{n_layer: 2, n_head: 2, d_model: 32, seq_len: 32, n_experts: 4}"]
    small += ["--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4"]
    out = _cli("fit", "--config", moe, *small, "--trainer.default_root_dir", tmp_path / "ep").stdout
    assert "expert_parallel_size=2) over 2 processes" in out
    _cli("fit", "--config", moe, *small, "--strategy", "{name: fsdp}", "--trainer.default_root_dir", tmp_path / "fsdp")
    ep, fsdp = _losses(tmp_path / "ep"), _losses(tmp_path / "fsdp")
    assert sorted(ep) == [1, 2, 3, 4]
    assert [ep[s] for s in sorted(ep)] == pytest.approx([fsdp[s] for s in sorted(fsdp)], abs=1e-5)
    rows = [r for r in csv.DictReader(open(tmp_path / "ep" / "metrics.csv")) if r.get("moe_aux_loss")]
    assert len(rows) == 4 and all(float(r["moe_aux_loss"]) >= 1.0 for r in rows)
    assert all(sum(float(r[f"moe_expert{e}_share"]) for e in range(4)) == pytest.approx(1.0) for r in rows)


def test_bad_config_exits_with_the_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {max_step: 3}\nmodel: {class_path: examples.gpt.model.GPTModule}\n")
    completed = subprocess.run(
        [sys.executable, "-m", "shardtrain", "fit", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "did you mean 'max_steps'" in completed.stderr and "Traceback" not in completed.stderr
    # A misspelt callback: named, with the fix, before any process starts (no run directory appears).
    typo = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardtrain",
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.callbacks+",
            "ThroughputMonitr",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "no Callback class 'ThroughputMonitr'; did you mean 'ThroughputMonitor'?" in typo.stderr
    assert not (tmp_path / "run").exists()


def test_help_lists_options_with_types_and_defaults():
    out = _cli("fit", "--help").stdout
    assert "--trainer.max_steps MAX_STEPS" in out and "(type: int, default: -1)" in out


def test_validate_command_prints_the_metrics():
    out = _cli(
        "validate",
        "--config",
        CONFIG,
        "--trainer.devices",
        "1",
        "--strategy.name",
        "single",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.callbacks",
        "[]",
    ).stdout
    (row,) = [line.split() for line in out.splitlines() if line.startswith("val_loss ")]  # the results table
    value = float(row[1])
    assert 5.0 < value < 6.0  # an untrained byte-level model: about ln(256) = 5.55


def test_estimate_command(tmp_path):
    import json

    payload = json.loads(
        _cli("estimate", "--config", CONFIG, "--devices", "8", "--device-memory", "80GiB", "--json").stdout
    )
    assert payload["devices"] == 8 and payload["recommended"] == "ddp" and payload["fits"]["fsdp"]
    tight = json.loads(_cli("estimate", "--config", CONFIG, "--device-memory", "1KiB", "--json").stdout)
    assert tight["recommended"] == "fsdp_cpu_offload" and not any(tight["fits"].values())
    table = _cli("estimate", "--config", CONFIG, "--device-memory", "80GiB").stdout
    assert "recommended: ddp" in table and "fsdp_cpu_offload" in table
    completed = subprocess.run(
        [sys.executable, "-m", "shardtrain", "estimate", "--config", str(CONFIG), "--device-memory", "eighty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2 and "write it like 80GiB" in completed.stderr
