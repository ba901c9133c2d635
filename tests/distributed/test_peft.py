"""LoRA through peft (``CausalLM(lora=...)``, ``shardtrain.hf.with_lora``) on a pretrained local Llama: the same
run under every layout as on one process, the frozen base untouched, optimizer state only for the adapters, a
resumed run on another world size continuing the curve, and exports that peft and transformers load (the
loss on a fixed batch is the trained model's)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from shardtrain.checkpoint.consolidate import consolidate_optimizer, load_weights
from shardtrain.cli import main as shardtrain_cli
from tests.distributed.hf_models import FINETUNE_LAYOUTS, save_llama, token_blocks
from tests.distributed.runner import assert_ok, run_script

pytest.importorskip("peft", reason="install the extra: pip install 'shardtrain[peft]'")

# q_proj and v_proj are split column-wise under tensor parallelism, o_proj row-wise.
LORA = json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]})
ADAPTER_TENSORS = 2 * 3 * 2  # 2 layers x (q_proj, v_proj, o_proj) x (lora_A, lora_B)
LAYOUTS = {
    **FINETUNE_LAYOUTS,
    "zero2": ("--strategy", "deepspeed", "--strategy-options", '{"stage": 2}', "--devices", "2", "--batch-size", "2"),
    "fsdp2_offload": (
        *FINETUNE_LAYOUTS["fsdp2"][:2],
        "--strategy-options",
        '{"cpu_offload": true}',
        "--devices",
        "2",
        "--batch-size",
        "2",
    ),
}
BF16_BASE = ("--frozen-dtype", "bf16")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("pretrained") / "llama")


@pytest.fixture(scope="module")
def one_process(llama, tmp_path_factory):
    """The reference: 4 LoRA steps on one process."""
    out = tmp_path_factory.mktemp("single")
    result = assert_ok(_finetune(out, llama, "single", "--max-steps", "4", "--dump")).result()
    return result, load_file(str(out / "weights.safetensors"))


def _finetune(out, llama, layout, *extra):
    return run_script("finetune_hf.py", out, "--model", str(llama), *LAYOUTS[layout], "--lora", LORA, *extra)


def _adapters(weights):
    return {name: tensor for name, tensor in weights.items() if "lora_" in name}


@pytest.mark.parametrize("layout", [pytest.param("fsdp2", marks=pytest.mark.fast), "ddp2", "zero3", "tp2", "pp2"])
def test_lora_equals_one_process_and_leaves_the_base_as_pretrained(llama, one_process, tmp_path, layout):
    reference, reference_weights = one_process
    result = assert_ok(_finetune(tmp_path, llama, layout, "--max-steps", "4", "--dump")).result()
    held = ADAPTER_TENSORS // 2 if layout == "pp2" else ADAPTER_TENSORS  # rank 0 of 2 stages: the first layer
    assert result["trainable_tensors"] == held
    assert result["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    weights = {n: t for n, t in load_file(str(tmp_path / "weights.safetensors")).items() if not t.is_meta}
    adapters, expected = _adapters(weights), _adapters(reference_weights)
    assert len(adapters) == held and set(adapters) <= set(expected)
    for name, tensor in adapters.items():  # summed in another order over ranks (ZeRO-3: 1.5e-6 after 4 Adam steps)
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        if "lora_B" in name:  # peft starts B at zero: it trained
            assert tensor.abs().max() > 0, name
    pretrained = load_weights(llama)
    base = {
        name.removeprefix("model.base_model.model.").replace(".base_layer.", "."): tensor
        for name, tensor in weights.items()
        if "lora_" not in name
    }
    assert set(base) <= set(pretrained) and len(base) >= len(pretrained) // 2
    for name, tensor in base.items():  # frozen: bit-identical to the pretrained files (bf16 read into fp32)
        assert torch.equal(tensor, pretrained[name].float()), name


@pytest.mark.fast
def test_lora_checkpoint_holds_adapter_state_resumes_on_one_process_and_exports_for_peft(llama, one_process, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference, reference_weights = one_process
    first = tmp_path / "first"
    assert_ok(_finetune(first, llama, "fsdp2", "--max-steps", "2", "--save"))
    checkpoint = first / "checkpoints" / "step=2"

    # The optimizer holds state for the adapters only (AdamW's step, exp_avg, exp_avg_sq of each).
    moments = load_file(str(consolidate_optimizer(checkpoint, tmp_path / "optimizer.safetensors")))
    with_state = {name.removeprefix("state.").rsplit(".", 1)[0] for name in moments}
    assert len(with_state) == ADAPTER_TENSORS and all("lora_" in name for name in with_state), with_state

    # Saved by 2 FSDP ranks, resumed on one process: the rest of the one-process curve.
    resumed = assert_ok(
        _finetune(tmp_path / "resumed", llama, "single", "--max-steps", "4", "--resume", str(checkpoint))
    ).result()
    assert resumed["steps"] == [3, 4]
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], abs=1e-5)

    # Exports: peft's adapter directory and the merged model, both without naming the base (the run recorded it).
    adapters, merged = tmp_path / "adapters", tmp_path / "merged"
    assert shardtrain_cli(["consolidate", str(checkpoint), str(adapters), "--format", "hf"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapters.iterdir()}
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(llama)
    assert shardtrain_cli(["consolidate", str(checkpoint), str(merged), "--format", "hf", "--merge-adapters"]) == 0

    trained = load_file(str(_dump_of(tmp_path, llama, checkpoint)))
    batch = token_blocks()[:4]

    def loss(model):
        with torch.no_grad():
            return model.eval()(input_ids=batch, labels=batch).loss.item()

    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with_adapters = PeftModel.from_pretrained(base, adapters)
    for name, tensor in with_adapters.state_dict().items():
        if "lora_" in name:
            assert torch.equal(tensor, trained[f"model.{name}"]), name
    expected = loss(_trained_model(llama, trained))
    assert loss(with_adapters) == pytest.approx(expected, abs=1e-6)
    assert loss(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)) == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(loss(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)), abs=1e-4)


def _dump_of(tmp_path, llama, checkpoint):
    """The checkpoint's weights as a process holds them (resume it for zero more steps, dump)."""
    out = tmp_path / "dump"
    assert_ok(_finetune(out, llama, "single", "--max-steps", "2", "--resume", str(checkpoint), "--dump"))
    return out / "weights.safetensors"


def _trained_model(llama, trained):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32),
        LoraConfig(task_type="CAUSAL_LM", **json.loads(LORA)),
    )
    model.load_state_dict({name.removeprefix("model."): tensor for name, tensor in trained.items()}, strict=True)
    return model


def _bytes(directory):
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def test_an_adapter_only_checkpoint_is_small_resumes_on_one_process_and_exports(llama, one_process, tmp_path):
    from transformers import AutoModelForCausalLM

    reference, _ = one_process
    whole, adapters_only = tmp_path / "whole", tmp_path / "adapters_only"
    assert_ok(_finetune(whole, llama, "fsdp2", "--max-steps", "2", "--save"))
    assert_ok(_finetune(adapters_only, llama, "fsdp2", "--max-steps", "2", "--save", "--trainable-only"))
    checkpoint = adapters_only / "checkpoints" / "step=2"
    saved = json.loads((checkpoint / "meta.json").read_text())
    assert saved["trainable_only"] == ["module"] and saved["state"]["pretrained"]["model"] == str(llama)
    small, full = _bytes(checkpoint), _bytes(whole / "checkpoints" / "step=2")
    print(f"checkpoint bytes: adapters only {small:,}, whole model {full:,}")
    assert small < full / 3  # adapters, their AdamW moments and the loop state; not the 21 pretrained tensors

    resumed = assert_ok(
        _finetune(tmp_path / "resumed", llama, "single", "--max-steps", "4", "--resume", str(checkpoint))
    ).result()  # the frozen weights read from the pretrained files again, the adapters from the checkpoint
    assert resumed["steps"] == [3, 4]
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], abs=1e-5)

    merged = tmp_path / "merged"
    assert shardtrain_cli(["consolidate", str(checkpoint), str(merged), "--format", "hf", "--merge-adapters"]) == 0
    whole_merged = tmp_path / "whole_merged"
    assert (
        shardtrain_cli(
            [
                "consolidate",
                str(whole / "checkpoints" / "step=2"),
                str(whole_merged),
                "--format",
                "hf",
                "--merge-adapters",
            ]
        )
        == 0
    )
    one = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    other = AutoModelForCausalLM.from_pretrained(whole_merged, dtype=torch.float32).state_dict()
    for name, tensor in one.items():  # the same model, whether the checkpoint held the frozen weights or not
        torch.testing.assert_close(tensor, other[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# frozen_dtype="bf16": the base stored (and computed) in bf16, the adapters and their optimizer state in fp32.


@pytest.fixture(scope="module")
def one_process_bf16_base(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_bf16_base")
    result = assert_ok(_finetune(out, llama, "single", "--max-steps", "4", "--dump", *BF16_BASE)).result()
    return result, load_file(str(out / "weights.safetensors"))


@pytest.mark.parametrize(
    "layout", [pytest.param("fsdp2", marks=pytest.mark.fast), "fsdp2_offload", "ddp2", "zero2", "pp2", "tp2"]
)
def test_a_bf16_base_with_fp32_adapters_trains_as_one_process(
    llama, one_process, one_process_bf16_base, tmp_path, layout
):
    reference, reference_weights = one_process_bf16_base
    assert reference["losses"] != pytest.approx(one_process[0]["losses"], abs=1e-4)  # a bf16 base computes in bf16
    result = assert_ok(_finetune(tmp_path, llama, layout, "--max-steps", "4", "--dump", *BF16_BASE)).result()
    # Tensor parallelism sums the row-wise layers' bf16 partial results over ranks: bf16 rounding apart (7e-3 seen).
    tolerance = 2e-2 if layout == "tp2" else 1e-5
    assert result["losses"] == pytest.approx(reference["losses"], abs=tolerance)
    weights = {n: t for n, t in load_file(str(tmp_path / "weights.safetensors")).items() if not t.is_meta}
    adapters = _adapters(weights)
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values())
    for name, tensor in adapters.items():
        expected = reference_weights[name]
        torch.testing.assert_close(
            tensor, expected, rtol=0, atol=tolerance / 2, msg=lambda m, name=name: f"{name}: {m}"
        )
    pretrained = load_weights(llama)
    for name, tensor in weights.items():
        if "lora_" not in name:  # held in bf16 (DeepSpeed's full state dict is fp32), as read from the files
            source = pretrained[name.removeprefix("model.base_model.model.").replace(".base_layer.", ".")]
            assert tensor.dtype == (torch.float32 if layout == "zero2" else torch.bfloat16), name
            assert torch.equal(tensor, source.to(tensor.dtype)), name


def test_a_bf16_base_checkpoint_resumes_on_one_process(llama, one_process_bf16_base, tmp_path):
    reference, _ = one_process_bf16_base
    first = tmp_path / "first"
    assert_ok(_finetune(first, llama, "fsdp2", "--max-steps", "2", "--save", *BF16_BASE))
    resumed = assert_ok(
        _finetune(
            tmp_path / "resumed",
            llama,
            "single",
            "--max-steps",
            "4",
            "--resume",
            str(first / "checkpoints" / "step=2"),
            *BF16_BASE,
        )
    ).result()
    assert resumed["steps"] == [3, 4]
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], abs=1e-5)


def test_a_bf16_base_under_zero3_in_fp32_is_refused_naming_what_works(llama, tmp_path):
    zero3_one_rank = ("--strategy", "deepspeed", "--strategy-options", '{"stage": 3}', "--devices", "1")
    result = run_script("finetune_hf.py", tmp_path, "--model", str(llama), *zero3_one_rank, "--lora", LORA, *BF16_BASE)
    assert result.returncode != 0
    assert "precision='bf16-mixed'" in result.output and "bfloat16, float32" in result.output, result.output[-3000:]
