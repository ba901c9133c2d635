"""examples/hf_finetune end to end, shrunk: make the model, fine-tune it for 6 steps with the example's
run config on 2 FSDP processes, export it with ``consolidate --format hf``, and generate with transformers."""

import csv
import math
import os
import sys

import pytest
import torch

from tests.distributed.runner import ROOT, run_process_group

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")
EXAMPLE = ROOT / "examples" / "hf_finetune"
PROMPT = "It is a truth universally acknowledged"


def _run(*args, timeout=180):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    returncode, output = run_process_group([sys.executable, *map(str, args)], env=env, timeout=timeout)
    assert returncode == 0, f"exit code {returncode}; output:\n{output[-6000:]}"
    return output


def test_the_hf_finetune_example_trains_exports_and_generates(tmp_path):
    from safetensors.torch import load_file

    from shardtrain.checkpoint.consolidate import consolidate

    pretrained, text, run = tmp_path / "pretrained", tmp_path / "train.txt", tmp_path / "run"
    made = _run(EXAMPLE / "make_model.py", "--out", pretrained, "--text", text, "--text-bytes", 200_000)
    assert "tokenizer: 512 tokens" in made and (pretrained / "model.safetensors").is_file()

    fit = _run(
        "-m",
        "shardtrain",
        "fit",
        "--config",
        EXAMPLE / "finetune.yaml",
        "--trainer.max_steps",
        "6",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.val_check_interval",
        "6",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.default_root_dir",
        run,
        "--model.init_args.model",
        pretrained,
        "--data.init_args.tokenizer",
        pretrained,
        "--data.init_args.files",
        f"[{text}]",
    )
    assert "FSDPStrategy(sharding_strategy='FULL_SHARD', cpu_offload=False) over 2 processes" in fit
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    losses = {
        int(r["step"]) + 1: float(r["train_loss"]) for r in rows if r.get("train_loss")
    }  # rows at Lightning's step (batches before): +1 is the optimizer step
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[1] == pytest.approx(math.log(512), abs=0.3)  # random weights: about uniform over the vocabulary
    assert losses[6] < losses[1] - 0.3
    validation = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(validation) == 1 and validation[0] < losses[1] - 0.3

    # The config's ModelCheckpoint saves at the end; consolidate exports what the `last` pointer names.
    checkpoint = run / "checkpoints" / "step=6"
    assert (run / "checkpoints" / "last").read_text().strip() == "step=6"
    exported = tmp_path / "exported"
    _run("-m", "shardtrain", "consolidate", run / "checkpoints" / "last", exported, "--format", "hf")
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in exported.iterdir()}

    # The exported model holds exactly the checkpoint's trained weights, under transformers' names.
    consolidate(checkpoint, tmp_path / "trained.safetensors")
    trained = {name.removeprefix("model."): t for name, t in load_file(tmp_path / "trained.safetensors").items()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(exported).state_dict()
    assert sorted(loaded) == sorted(trained) and len(trained) == 4 * 9 + 3
    for name, tensor in trained.items():
        assert torch.equal(loaded[name], tensor), name
    initial = load_file(pretrained / "model.safetensors")
    assert sorted(initial) == sorted(trained)
    assert all(not torch.equal(initial[name], trained[name]) for name in trained if name.endswith("proj.weight"))

    # generate.py prints the model's greedy continuation: 40 new tokens (no end-of-text among them).
    generated = _run(EXAMPLE / "generate.py", exported, "--prompt", PROMPT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0]
    assert len(expected) == prompt["input_ids"].shape[1] + 40 and tokenizer.eos_token_id not in expected.tolist()
    assert tokenizer.decode(expected, skip_special_tokens=True) + "\n" in generated


def test_the_lora_config_trains_only_adapters_and_exports_them_for_peft(tmp_path):
    peft = pytest.importorskip("peft")
    pretrained, text, run, adapters = tmp_path / "pretrained", tmp_path / "train.txt", tmp_path / "run", tmp_path / "a"
    _run(EXAMPLE / "make_model.py", "--out", pretrained, "--text", text, "--text-bytes", 100_000)
    _run(
        "-m", "shardtrain", "fit", "--config", EXAMPLE / "lora.yaml", "--trainer.max_steps", "4",
        "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", run,
        "--model.init_args.model", pretrained, "--data.init_args.tokenizer", pretrained,
        "--data.init_args.files", f"[{text}]",
    )  # fmt: skip
    losses = [float(r["train_loss"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train_loss")]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    _run("-m", "shardtrain", "consolidate", run / "checkpoints" / "last", adapters, "--format", "hf")
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(pretrained), adapters)
    trained = {n: t for n, t in model.state_dict().items() if "lora_B" in n}
    assert len(trained) == 4 * 7 and all(t.abs().max() > 0 for t in trained.values())  # 4 layers x 7 projections
