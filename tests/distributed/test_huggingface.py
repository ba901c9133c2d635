"""Hugging Face checkpoints in (read into each rank's shards) and out (a directory transformers loads).

The models are made locally (no hub): a Llama saved in bf16 over several files with an index, and a
GPT-2 (Conv1D layers, output layer tied to the embedding). The pretrained model's own loss on the
first batch, computed by transformers in this process, must be the first training loss under
every strategy.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from shardtrain.checkpoint.consolidate import consolidate_optimizer, load_weights
from shardtrain.cli import main as shardtrain_cli
from tests.distributed.hf_models import FINETUNE_LAYOUTS, reference_loss, save_gpt2, save_llama
from tests.distributed.runner import assert_ok, run_script

pytest.importorskip("transformers", reason="install the extra: pip install 'shardtrain[hf]'")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    llama, gpt2 = save_llama(root / "llama"), save_gpt2(root / "gpt2")
    assert len(json.loads((llama / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    assert len(list(llama.glob("*.safetensors"))) > 1, "the Llama must be a multi-file checkpoint"
    return {"llama": llama, "gpt2": gpt2}


LAYOUTS = dict(FINETUNE_LAYOUTS)
CASES = [("llama", layout) for layout in LAYOUTS] + [("gpt2", layout) for layout in LAYOUTS if layout != "tp2"]
# The bf16 files read into bf16 weights (precision bf16-true).
CASES.append(("llama", "fsdp2-bf16-true"))
LAYOUTS["fsdp2-bf16-true"] = (*LAYOUTS["fsdp2"], "--precision", "bf16-true")


FAST = {("llama", "fsdp2")}  # in the fast tier: a multi-file bf16 Llama read into FSDP shards


@pytest.mark.parametrize(
    "model, layout",
    [pytest.param(m, layout, marks=[pytest.mark.fast] if (m, layout) in FAST else []) for m, layout in CASES],
    ids=[f"{m}-{layout}" for m, layout in CASES],
)
def test_the_pretrained_models_own_first_batch_loss_is_the_first_training_loss(checkpoints, tmp_path, model, layout):
    # GPT-2 has no tensor-parallel plan (Conv1D layers), so it is not run under tp2. Under pp2 its output
    # layer, tied to the embedding, is on the second stage and the embedding on the first.
    result = assert_ok(
        run_script("finetune_hf.py", tmp_path, "--model", str(checkpoints[model]), *LAYOUTS[layout])
    ).result()
    expected = reference_loss(
        checkpoints[model], rows=4, seed=1234
    )  # the script's seed  # about 8.5: a fresh initialisation gives ln(256) = 5.5
    if layout.endswith("bf16-true"):  # computed in bf16: within one bf16 rounding step (2**-8) of fp32's loss
        assert result["losses"][0] == pytest.approx(expected, rel=2**-8)
    else:
        assert result["losses"][0] == pytest.approx(expected, abs=2e-6)


def test_an_fsdp_run_exports_a_directory_transformers_loads_with_the_trained_weights(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    result = assert_ok(
        run_script(
            "finetune_hf.py",
            run,
            "--model",
            str(checkpoints["gpt2"]),
            *LAYOUTS["fsdp2"],
            "--max-steps",
            "3",
            "--save",
            "--dump",
        )
    ).result()
    assert result["steps"] == [1, 2, 3]
    exported = tmp_path / "exported"
    checkpoint = run / "checkpoints" / "step=3"
    assert (
        shardtrain_cli(
            ["consolidate", str(checkpoint), str(exported), "--format", "hf", "--hf-config", str(checkpoints["gpt2"])]
        )
        == 0
    )
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    stored = load_file(str(exported / "model.safetensors"))
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored, "a tied weight is stored once"

    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    trained = load_file(str(run / "weights.safetensors"))
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    state = reloaded.state_dict()
    assert len(state) == len(trained) > 20
    for name, tensor in state.items():
        assert torch.equal(tensor, trained[f"model.{name}"]), name
    pretrained = AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"], dtype=torch.float32)
    assert not torch.equal(pretrained.transformer.h[0].attn.c_attn.weight, state["transformer.h.0.attn.c_attn.weight"])


def test_a_multi_file_export_has_an_index_and_loads(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert_ok(
        run_script("finetune_hf.py", run, "--model", str(checkpoints["llama"]), *LAYOUTS["single"], "--save", "--dump")
    )
    exported = tmp_path / "exported"
    assert shardtrain_cli(
        ["consolidate", str(run / "checkpoints" / "step=1"), str(exported), "--format", "hf",
         "--hf-config", str(checkpoints["llama"]), "--max-shard-size", "100KiB", "--dtype", "bf16"]
    ) == 0  # fmt: skip
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    assert reloaded.dtype == torch.bfloat16
    trained = load_file(str(run / "weights.safetensors"))
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[f"model.{name}"].to(torch.bfloat16)), name


@pytest.mark.parametrize("layout", ["fsdp2", "zero3"])
def test_frozen_parameters_stay_pretrained_and_a_resumed_run_continues_the_loss_curve(checkpoints, tmp_path, layout):
    frozen = ("--freeze", "model.embed_tokens.*", "model.layers.0.*")
    model = ("--model", str(checkpoints["llama"]), *LAYOUTS[layout], *frozen)
    straight = assert_ok(
        run_script("finetune_hf.py", tmp_path / "straight", *model, "--max-steps", "4", "--dump")
    ).result()
    assert straight["trainable_tensors"] == 21 - 1 - 9
    trained = load_file(str(tmp_path / "straight" / "weights.safetensors"))
    pretrained = load_weights(checkpoints["llama"])
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(trained[f"model.{name}"], pretrained[name].float()), f"{name} is frozen"
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(trained[f"model.{name}"], pretrained[name].float()), f"{name} trains"

    first = assert_ok(run_script("finetune_hf.py", tmp_path / "first", *model, "--max-steps", "2", "--save")).result()
    resumed = assert_ok(
        run_script(
            "finetune_hf.py", tmp_path / "resumed", *model, "--max-steps", "4",
            "--resume", str(tmp_path / "first" / "checkpoints" / "step=2"),
        )
    ).result()  # fmt: skip
    moments = load_file(
        str(consolidate_optimizer(tmp_path / "first" / "checkpoints" / "step=2", tmp_path / "opt.safetensors"))
    )
    with_state = {name.removeprefix("state.").rsplit(".", 1)[0] for name in moments}
    assert len(with_state) == 11 and not any(".embed_tokens." in n or ".layers.0." in n for n in with_state), with_state
    assert first["losses"] == pytest.approx(straight["losses"][:2], abs=1e-6)
    assert resumed["steps"] == [3, 4]
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], abs=1e-6)
