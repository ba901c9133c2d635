"""Tensor parallelism and FSDP x TP over real processes: the same numbers as one process, checkpoints
that resume across layouts, and a 2-D checkpoint consolidated to whole weights.

Every run trains the GPT example (2 layers, 2 heads, width 64) for 10 steps on the same global
batch of 16 with the gradient clipped at 0.5 (the norms are about 1.6-2.2, so clipping acts on
every step): one process, ``tensor_parallel_size=2`` on 2 processes, and data 2 x tensor 2 on 4.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.runner import assert_ok, run_script
from tests.distributed.test_consolidate import _consolidate

pytestmark = pytest.mark.distributed

CLIP = ("--clip", "0.5")
SINGLE = ("--devices", "1", "--batch-size", "16", *CLIP)
TP2 = ("--devices", "2", "--strategy", "model_parallel", "--batch-size", "16", *CLIP)
TP2_OPTIONS = ("--strategy", "model_parallel", "--strategy-options", '{"tensor_parallel_size": 2}')
DP2_TP2 = ("--devices", "4", *TP2_OPTIONS, "--batch-size", "8", *CLIP)  # 2 data-parallel ranks x 8
FSDP2 = ("--devices", "2", "--strategy", "fsdp", "--batch-size", "8", *CLIP)
SAMPLE = ("--sample-bytes", "4")  # greedy bytes after a 3-byte prompt: contexts of 3 to 6, odd and even
SEQUENCE_PARALLEL = ("--strategy-options", '{"sequence_parallel": true}')
#: The sequence-parallel plan also splits the norms' weights: replicated DTensors, whose gradients are summed.
NORMS = {"model.norm.weight", *(f"model.blocks.{i}.{norm}.weight" for i in (0, 1) for norm in ("norm1", "norm2"))}
#: What the GPT example's plan splits (the output layer's weight is the embedding's: tied).
SPLIT_BY_THE_PLAN = {
    "model.token_embedding.weight",
    *(f"model.blocks.{i}.{layer}.weight" for i in (0, 1) for layer in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return assert_ok(run_script("train_gpt.py", out, *SINGLE, "--throughput-monitor", *SAMPLE)).result()


def _assert_same_numbers(result, single):
    assert result["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert result["grad_norm_logged"] == pytest.approx(single["grad_norm_logged"], rel=1e-5)
    assert max(single["grad_norm_logged"]) > 1.0, "the clip at 0.5 must act"
    assert result["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-6)


@pytest.mark.fast
def test_tensor_parallel_matches_one_process(single, tmp_path):
    result = assert_ok(run_script("train_gpt.py", tmp_path, *TP2, "--throughput-monitor")).result()
    assert result["world_size"] == 2 and result["data_parallel_size"] == 1
    assert set(result["tensor_parallel_parameters"]) == SPLIT_BY_THE_PLAN
    assert result["tied"], "the output layer must still share the embedding's (split) weight"
    assert result["logits_layout"] == "whole"  # colwise_rep gathers them
    # The blocks' matrices and the embedding are split in two; norms and positions stay whole.
    assert result["local_parameter_numel"] < 0.55 * result["parameters"]
    _assert_same_numbers(result, single)
    # Throughput counts the batch the two ranks share once: FLOPs per sample as on one process (the
    # count misses the other rank's half of the attention scores, ~4% here; see ThroughputMonitor).
    figures = result["throughput"][-1]
    per_batch = figures["throughput/flops_per_sec"] / figures["throughput/samples_per_sec"] * 16
    assert per_batch == pytest.approx(result["flops_per_batch"], rel=1e-6)
    assert result["flops_per_batch"] == pytest.approx(single["flops_per_batch"], rel=0.05)
    assert figures["throughput/flops_per_sec_per_device"] * 2 == pytest.approx(figures["throughput/flops_per_sec"])


def test_compiled_blocks_under_tensor_parallelism_match_one_process(single, tmp_path):
    """``compile=True`` compiles each block after splitting it (Inductor builds C++ kernels on the CPU),
    here with sequence parallelism: DTensor norms inside the compiled blocks. Generation after the fit
    runs new shapes, which compile again (``dynamic=False`` under tensor parallelism)."""
    options = ("--strategy-options", '{"compile": true, "sequence_parallel": true}')
    result = assert_ok(run_script("train_gpt.py", tmp_path, *TP2, *options, *SAMPLE)).result()
    _assert_same_numbers(result, single)
    assert result["sample"] == single["sample"]


def test_loss_parallel_computes_the_loss_from_logits_split_by_vocabulary(tmp_path):
    """With ``loss_parallel`` no rank gathers whole logits; losses, clipped norms, weights and the
    validation losses equal one process's (validation every 5 steps on both runs)."""
    validating = ("--val-check-interval", "5")
    one = assert_ok(run_script("train_gpt.py", tmp_path / "one", *SINGLE, *validating)).result()
    options = ("--strategy-options", '{"loss_parallel": true}')
    split = assert_ok(run_script("train_gpt.py", tmp_path / "split", *TP2, *options, *validating)).result()
    _assert_same_numbers(split, one)
    assert split["val_losses"].keys() == one["val_losses"].keys() == {"5", "10"}
    assert list(split["val_losses"].values()) == pytest.approx(list(one["val_losses"].values()), abs=1e-5)
    assert split["tied"] and split["logits_layout"] == ["S(2)"]  # (batch, seq, vocab / 2) per rank


@pytest.mark.parametrize(
    "loss_parallel", [False, pytest.param(True, marks=pytest.mark.fast)], ids=["gathered-logits", "loss-parallel"]
)
def test_sequence_parallelism_matches_one_process(single, tmp_path, loss_parallel):
    """The GPT's ``sequence_parallel_tp_plan``: norms and the residual stream hold half the sequence
    per rank. Losses, clipped norms (split and replicated gradients together), weights and greedy
    generation (contexts padded to an even length) equal one process's."""
    options = json.dumps({"sequence_parallel": True, "loss_parallel": loss_parallel})
    result = assert_ok(run_script("train_gpt.py", tmp_path, *TP2, "--strategy-options", options, *SAMPLE)).result()
    assert set(result["tensor_parallel_parameters"]) == SPLIT_BY_THE_PLAN | NORMS
    assert result["logits_layout"] == (["S(2)"] if loss_parallel else "whole")
    _assert_same_numbers(result, single)
    assert result["sample"] == single["sample"] and len(single["sample"]) == 4


def test_sequence_parallelism_refuses_a_sequence_the_ranks_do_not_divide(tmp_path):
    run = run_script("train_gpt.py", tmp_path, *TP2, *SEQUENCE_PARALLEL, "--seq-len", "31", "--max-steps", "1")
    assert run.returncode != 0
    assert "'blocks.0' splits dimension 1 of its input (length 31" in run.output
    assert "make sequences a multiple of 2 long" in run.output


def test_data_2_by_sequence_parallel_2_then_resumed_on_one_process(single, tmp_path):
    """2-D with sequence parallelism matches one process for 5 steps; its checkpoint (the norms'
    replicated DTensors included) resumes on one process and continues the loss curve."""
    options = ("--devices", "4", "--strategy", "model_parallel", "--batch-size", "8", *CLIP)
    sp_2d = ("--strategy-options", '{"sequence_parallel": true, "tensor_parallel_size": 2}')
    first = assert_ok(run_script("train_gpt.py", tmp_path, *options, *sp_2d, "--stop-at", "5", "--save-at-end"))
    assert first.result()["losses"] == pytest.approx(single["losses"][:5], abs=1e-5)
    assert first.result()["grad_norm_logged"] == pytest.approx(single["grad_norm_logged"][:5], rel=1e-5)
    resumed = assert_ok(run_script("train_gpt.py", tmp_path, *SINGLE, "--ckpt-path", "last")).result()
    assert resumed["steps"] == list(range(6, 11))
    assert resumed["losses"] == pytest.approx(single["losses"][5:], abs=1e-5)
    assert resumed["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-6)


@pytest.mark.parametrize("layout", [TP2, DP2_TP2], ids=["tp2", "dp2xtp2"])
def test_a_module_that_parallelises_itself_in_configure_model(single, tmp_path, layout):
    """Lightning's contract: the strategy applies no plan of its own, and under 2-D still shards
    the self-parallelised model with FSDP over the data-parallel ranks."""
    result = assert_ok(run_script("train_gpt.py", tmp_path, *layout, "--self-parallel")).result()
    # Only what configure_model split (the blocks), not the model's own plan (the embedding too).
    assert set(result["tensor_parallel_parameters"]) == SPLIT_BY_THE_PLAN - {"model.token_embedding.weight"}
    _assert_same_numbers(result, single)


@pytest.mark.fast
def test_data_2_by_tensor_2_with_accumulation_matches_one_process(single, tmp_path):
    options = ("--devices", "4", *TP2_OPTIONS, "--batch-size", "4", "--accumulate", "2", *CLIP)  # 2 x 4 x 2 = 16
    result = assert_ok(run_script("train_gpt.py", tmp_path, *options)).result()
    assert result["world_size"] == 4 and result["data_parallel_size"] == 2
    assert set(result["tensor_parallel_parameters"]) == SPLIT_BY_THE_PLAN
    # FSDP shards each tensor-parallel half again over the 2 data-parallel ranks.
    assert result["local_parameter_numel"] < 0.3 * result["parameters"]
    _assert_same_numbers(result, single)


@pytest.mark.parametrize(
    "save_with, resume_with",
    [(TP2, SINGLE), (DP2_TP2, FSDP2), (FSDP2, DP2_TP2)],
    ids=["tp(2)->single(1)", "dp2xtp2(4)->fsdp(2)", "fsdp(2)->dp2xtp2(4)"],
)
def test_resume_across_layouts_continues_the_loss_curve(single, tmp_path, save_with, resume_with):
    assert_ok(run_script("train_gpt.py", tmp_path, *save_with, "--stop-at", "5", "--save-at-end"))
    assert (tmp_path / "checkpoints" / "last").read_text() == "step=5"
    resumed = assert_ok(run_script("train_gpt.py", tmp_path, *resume_with, "--ckpt-path", "last")).result()
    assert resumed["steps"] == list(range(6, 11))
    assert resumed["losses"] == pytest.approx(single["losses"][5:], abs=1e-5)
    assert resumed["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-6)


def test_consolidate_a_2d_checkpoint(tmp_path):
    train = tmp_path / "train"
    assert_ok(run_script("train_gpt.py", train, *DP2_TP2, "--max-steps", "3", "--save-at-end", "--dump-weights", "end"))
    trained = load_file(str(train / "weights_end.safetensors"))
    exported = load_file(_consolidate(train / "checkpoints" / "step=3", tmp_path / "model.safetensors")[0])
    assert exported.keys() == trained.keys() and len(exported) > 10
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize(
    "layout, tie",
    [
        (("--devices", "2", "--strategy", "model_parallel"), True),
        (("--devices", "4", *TP2_OPTIONS, "--batch-size", "8"), False),
    ],
    ids=["tp2-tied", "dp2xtp2"],
)
def test_a_hugging_face_llama_trains_with_its_own_plan_and_no_parallel_code(tmp_path, layout, tie):
    tied = ("--tie",) if tie else ()
    single = assert_ok(run_script("train_hf_llama.py", tmp_path / "single", *tied)).result()
    result = assert_ok(run_script("train_hf_llama.py", tmp_path / "tp", *layout, *tied)).result()
    assert result["tied"] == single["tied"] == tie
    split = {name.removeprefix("model.") for name in result["split_parameters"]}
    assert {"model.layers.1.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= split
    assert result["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert result["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)
    assert max(single["grad_norms"]) > 1.0, "the clip at 0.5 must act"
