"""Expert parallelism over real processes: the GPT example with a mixture of experts in each block (4 experts, top 2),
its experts divided over 2 ranks and tokens sent to them by all-to-all on gloo, gives one process's numbers (losses,
the clipped gradient's norm, the routers' statistics, the weights), alone and with data or tensor parallelism, and
its checkpoints resume across layouts.

Every run trains 2 layers of width 64 on sequences of 32 for 10 steps on the same global batch of 16 with the
gradient clipped at 0.5 (the norm, unlike the losses under AdamW, shows a gradient off by a constant factor).
"""

import json

import pytest
import torch

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed

CLIP = ("--clip", "0.5")
MOE = ("--experts", "4", "--top-k", "2")
SINGLE = ("--devices", "1", "--batch-size", "16", *CLIP, *MOE)


def _layout(devices: int, batch: int, **options: int) -> tuple[str, ...]:
    return (
        *("--devices", str(devices), "--batch-size", str(batch), *CLIP, *MOE),
        *("--strategy", "model_parallel", "--strategy-options", json.dumps(options)),
    )


EP2 = _layout(2, 8, expert_parallel_size=2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return assert_ok(run_script("train_gpt.py", tmp_path_factory.mktemp("single"), *SINGLE)).result()


def _assert_same_numbers(result, single):
    assert result["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert result["grad_norm_logged"] == pytest.approx(single["grad_norm_logged"], rel=1e-5)
    assert max(single["grad_norm_logged"]) > 1.0, "the clip at 0.5 must act"
    assert result["moe_aux_losses"] == pytest.approx(single["moe_aux_losses"], abs=1e-5)
    assert len(single["moe_shares"]) == 10 and len(single["moe_shares"][0]) == 4
    flat = [share for step in result["moe_shares"] for share in step]
    assert flat == pytest.approx([share for step in single["moe_shares"] for share in step], abs=1e-6)
    assert result["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-6)


@pytest.mark.fast
def test_experts_divided_over_two_ranks_match_one_process(single, tmp_path):
    result = assert_ok(run_script("train_gpt.py", tmp_path, *EP2)).result()
    assert result["world_size"] == 2 and result["data_parallel_size"] == 2
    _assert_same_numbers(result, single)
    # The routers spread each step's choices over the experts, not evenly: the balance loss is above 1.
    assert all(sum(step) == pytest.approx(1.0) and max(step) - min(step) > 0.02 for step in single["moe_shares"])
    assert all(loss > 1.0 for loss in single["moe_aux_losses"])
    # Each rank holds half the experts (and FSDP half of everything else).
    assert result["local_parameter_numel"] < 0.55 * result["parameters"]


def test_experts_over_two_ranks_of_four_data_parallel_ranks_match_one_process(single, tmp_path):
    """4 data-parallel ranks, experts divided over pairs of them; FSDP shards each pair's experts over the 2 pairs."""
    result = assert_ok(run_script("train_gpt.py", tmp_path, *_layout(4, 4, expert_parallel_size=2))).result()
    assert result["world_size"] == 4 and result["data_parallel_size"] == 4
    _assert_same_numbers(result, single)
    assert result["local_parameter_numel"] < 0.3 * result["parameters"]


def test_experts_over_two_ranks_with_tensor_parallel_2_match_one_process(tmp_path):
    """Data 2 x tensor 2, experts divided over the 2 data-parallel ranks of each tensor-parallel position; a shared
    expert split by tensor parallelism as the dense MLP is. (A group of one holding the same experts: FSDP2's divide
    factor on one rank.)"""
    shared = ("--shared-expert",)
    one = assert_ok(run_script("train_gpt.py", tmp_path / "one", *SINGLE, *shared)).result()
    layout = _layout(4, 8, expert_parallel_size=2, tensor_parallel_size=2)
    result = assert_ok(run_script("train_gpt.py", tmp_path / "four", *layout, *shared)).result()
    assert result["world_size"] == 4 and result["data_parallel_size"] == 2
    _assert_same_numbers(result, one)
    assert "model.blocks.0.mlp.shared.up.weight" in result["tensor_parallel_parameters"]
    assert "model.blocks.0.mlp.experts.up" not in result["tensor_parallel_parameters"]


@pytest.mark.parametrize(
    "save_with, resume_with",
    [(EP2, SINGLE), (("--devices", "2", "--strategy", "fsdp", "--batch-size", "8", *CLIP, *MOE), EP2)],
    ids=["ep2-to-one-process", "fsdp2-to-ep2"],
)
def test_resume_across_expert_parallel_layouts_continues_the_loss_curve(single, tmp_path, save_with, resume_with):
    assert_ok(run_script("train_gpt.py", tmp_path, *save_with, "--stop-at", "5", "--save-at-end"))
    resumed = assert_ok(run_script("train_gpt.py", tmp_path, *resume_with, "--ckpt-path", "last")).result()
    assert resumed["steps"] == list(range(6, 11))
    assert resumed["losses"] == pytest.approx(single["losses"][5:], abs=1e-5)
    assert resumed["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ("--experts", "3", "--top-k", "1"),
            "has 3 experts, which expert_parallel_size=2 does not divide",
        ),
        ((), "has no mixture-of-experts layer shardtrain recognises"),
    ],
    ids=["experts-not-divisible", "dense-model"],
)
def test_bad_expert_layouts_are_refused_before_training_naming_the_fix(tmp_path, flags, message):
    layout = ("--devices", "2", "--strategy", "model_parallel")
    layout += ("--strategy-options", json.dumps({"expert_parallel_size": 2}))
    run = run_script("train_gpt.py", tmp_path, *layout, *flags, "--max-steps", "1")
    assert run.returncode != 0
    assert message in run.output
    assert "choose an expert_parallel_size" in run.output or "leave expert_parallel_size at 1" in run.output


def test_a_hugging_face_mixtral_with_its_experts_over_two_ranks_matches_fsdp(tmp_path):
    """transformers' own MoE code, no code of the user's: CausalLM builds a 2-layer Mixtral from its config (seeded
    weights), expert parallelism finds its experts (transformers' experts interface) and divides them. Against FSDP
    over the same 2 ranks (the same batches; FSDP against one process is tested with Llama): the same losses and
    weights after 3 steps."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from tests.distributed.hf_models import save_mixtral

    mixtral = save_mixtral(tmp_path / "mixtral")

    def finetune(name, *layout):
        flags = ("--model", str(mixtral), "--from-scratch", "--max-steps", "3", "--dump", "--devices", "2")
        run = assert_ok(run_script("finetune_hf.py", tmp_path / name, *flags, "--batch-size", "2", *layout))
        return run.result(), load_file(str(tmp_path / name / "weights.safetensors"))

    fsdp, fsdp_weights = finetune("fsdp", "--strategy", "fsdp")
    options = json.dumps({"expert_parallel_size": 2})
    ep, ep_weights = finetune("ep2", "--strategy", "model_parallel", "--strategy-options", options)
    assert ep["losses"] == pytest.approx(fsdp["losses"], abs=1e-5)
    assert fsdp["losses"][0] != fsdp["losses"][-1]
    assert any(".mlp.experts.gate_up_proj" in name for name in ep_weights)
    for name, tensor in fsdp_weights.items():
        torch.testing.assert_close(ep_weights[name], tensor, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_ranks_that_receive_no_token_train_as_fsdp_does(tmp_path):
    """Experts written as transformers' eager loop (weights indexed only for the experts rows name) and routing
    fixed by the data so that, with experts over pairs of 4 ranks, ranks 1 and 2 receive no row: their experts are
    out of the graph while their FSDP partners' are not. The run neither hangs nor errs, and equals FSDP over the
    same 4 ranks (the first step's full gradients and the weights after 2 steps)."""
    options = json.dumps({"expert_parallel_size": 2})
    layouts = {"fsdp": ("--strategy", "fsdp"), "ep": ("--strategy", "model_parallel", "--strategy-options", options)}
    results = {
        name: assert_ok(run_script("expert_routing.py", tmp_path / name, "--devices", "4", *flags)).result()
        for name, flags in layouts.items()
    }
    fsdp, ep = results["fsdp"], results["ep"]
    assert fsdp["gradient_norms"]["experts.weight"] > 0
    assert ep["gradient_norms"] == pytest.approx(fsdp["gradient_norms"], rel=1e-6)
    assert ep["weight_sums"] == pytest.approx(fsdp["weight_sums"], rel=1e-6)
