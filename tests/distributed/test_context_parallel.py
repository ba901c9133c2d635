"""Context parallelism over real processes: each sequence split over 2 ranks (PyTorch's ring attention, on gloo
through the CPU glue in ``shardtrain.parallel.context_parallel``) gives one process's numbers, and its checkpoints
resume across layouts; alone and composed with data, tensor and pipeline parallelism.

Every run trains the GPT example (2 layers, 2 heads, width 64, sequences of 32; 4 layers under pipeline stages,
as in the pipeline tests) for 10 steps on the same global batch of 16 with the gradient clipped at 0.5 (clipping
acts on every step), as the tensor-parallel tests do.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.hf_models import FINETUNE_LAYOUTS, save_llama
from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed

CLIP = ("--clip", "0.5")
SINGLE = ("--devices", "1", "--batch-size", "16", *CLIP, "--val-check-interval", "5")
CP2 = ("--devices", "2", "--strategy", "model_parallel", "--strategy-options", '{"context_parallel_size": 2}')
CP2_RUN = (*CP2, "--batch-size", "16", *CLIP)  # both ranks read the same batch: one data-parallel group
DP2_CP2_RUN = ("--devices", "4", *CP2[2:], "--batch-size", "8", *CLIP)  # 2 data-parallel groups x 8
FSDP2_RUN = ("--devices", "2", "--strategy", "fsdp", "--batch-size", "8", *CLIP)
CP2_TP2 = ("--devices", "4", "--strategy", "model_parallel")
CP2_TP2 += ("--strategy-options", '{"context_parallel_size": 2, "tensor_parallel_size": 2}')
CP2_PP2 = ("--devices", "4", "--strategy", "model_parallel")
CP2_PP2 += ("--strategy-options", '{"context_parallel_size": 2, "pipeline_parallel_size": 2, "microbatches": 2}')


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return assert_ok(run_script("train_gpt.py", out, *SINGLE)).result()


def _assert_same_numbers(result, single):
    assert result["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert result["grad_norm_logged"] == pytest.approx(single["grad_norm_logged"], rel=1e-5)
    assert max(single["grad_norm_logged"]) > 1.0, "the clip at 0.5 must act"
    assert result["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-6)


def _positions(out, ranks):
    return [json.loads((out / f"positions_rank{rank}.json").read_text()) for rank in range(ranks)]


@pytest.mark.fast
def test_two_ranks_splitting_each_sequence_match_one_process(single, tmp_path):
    result = assert_ok(run_script("train_gpt.py", tmp_path, *CP2_RUN, "--val-check-interval", "5")).result()
    assert result["world_size"] == 2 and result["data_parallel_size"] == 1
    _assert_same_numbers(result, single)
    # Each rank's step saw its half of the sequence: 4 chunks of 8, rank 0 the first and last (load balance).
    halves = [[*range(0, 8), *range(24, 32)], list(range(8, 24))]
    assert _positions(tmp_path, 2) == halves
    # Validation is split as training is, and gives one process's val_loss: synced over the ranks, and each rank's
    # own unsynced value too (the parts of its sequences combined over the context-parallel ranks).
    assert [json.loads((tmp_path / f"val_positions_rank{rank}.json").read_text()) for rank in range(2)] == halves
    assert len(single["val_losses"]) == 2
    assert result["val_losses"] == pytest.approx(single["val_losses"], abs=1e-5)
    assert result["val_losses_rank0"] == pytest.approx(single["val_losses_rank0"], abs=1e-5)
    # FSDP shards the parameters over the 2 context-parallel ranks.
    assert result["local_parameter_numel"] < 0.6 * result["parameters"]


def test_data_2_by_context_2_matches_one_process(single, tmp_path):
    result = assert_ok(run_script("train_gpt.py", tmp_path, *DP2_CP2_RUN)).result()
    assert result["world_size"] == 4 and result["data_parallel_size"] == 2
    _assert_same_numbers(result, single)
    first, second = [*range(0, 8), *range(24, 32)], list(range(8, 24))
    assert _positions(tmp_path, 4) == [first, second, first, second]  # ranks (dp, cp): (0,0) (0,1) (1,0) (1,1)


@pytest.mark.parametrize("options", [{}, {"sequence_parallel": True, "loss_parallel": True}], ids=["tp", "sp-loss"])
def test_context_2_by_tensor_2_matches_one_process(single, tmp_path, options):
    """Tensor parallelism splits the heads within each pair of ranks, context parallelism the sequence across the
    pairs; FSDP shards each tensor-parallel share over the context ranks. Also with sequence parallelism (each
    rank's part of the sequence split again over the tensor-parallel ranks) and loss parallelism."""
    layout = (*CP2_TP2[:-1], json.dumps({"context_parallel_size": 2, "tensor_parallel_size": 2, **options}))
    result = assert_ok(run_script("train_gpt.py", tmp_path, *layout, "--batch-size", "16", *CLIP)).result()
    assert result["world_size"] == 4 and result["data_parallel_size"] == 1
    _assert_same_numbers(result, single)
    first, second = [*range(0, 8), *range(24, 32)], list(range(8, 24))
    assert _positions(tmp_path, 4) == [first, first, second, second]  # ranks (cp, tp): (0,0) (0,1) (1,0) (1,1)
    assert result["local_parameter_numel"] < 0.35 * result["parameters"]  # a quarter, but for replicated norms


def test_context_2_by_pipeline_2_matches_one_process(tmp_path):
    """Two pipeline stages, each over a pair of ranks that split the sequence: the batch is split once, before the
    schedule cuts it into micro-batches, and each stage's attention runs its ring within its pair. Validation
    batches are split too (the stages exchange buffers of the split shape)."""
    script = "train_gpt_pipeline.py"
    one = assert_ok(run_script(script, tmp_path / "one", "--val-check-interval", "5")).result()
    options = {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "context_parallel_size": 2}
    layout = ("--devices", "4", "--strategy", "model_parallel", "--strategy-options", json.dumps(options))
    result = assert_ok(run_script(script, tmp_path / "four", *layout, "--val-check-interval", "5")).result()
    assert result["mesh"] == {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "cp": 2}
    assert result["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert len(one["val_losses"]) == 2 and result["val_losses"] == pytest.approx(one["val_losses"], abs=1e-5)
    assert result["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    whole = load_file(str(tmp_path / "one" / "weights_rank0.safetensors"))
    held = {}
    for rank in range(4):  # each stage's weights, gathered from its FSDP shards over the context pair
        held.update(load_file(str(tmp_path / "four" / f"weights_rank{rank}.safetensors")))
    assert set(held) == set(whole)
    for name, tensor in whole.items():
        torch.testing.assert_close(held[name], tensor, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "save_with, resume_with",
    [(CP2_RUN, SINGLE), (FSDP2_RUN, CP2_RUN)],
    ids=["context2-to-one-process", "fsdp2-to-context2"],
)
def test_resume_across_context_parallel_layouts_continues_the_loss_curve(single, tmp_path, save_with, resume_with):
    assert_ok(run_script("train_gpt.py", tmp_path, *save_with, "--stop-at", "5", "--save-at-end"))
    resumed = assert_ok(run_script("train_gpt.py", tmp_path, *resume_with, "--ckpt-path", "last")).result()
    assert resumed["steps"] == list(range(6, 11))
    assert resumed["losses"] == pytest.approx(single["losses"][5:], abs=1e-5)
    assert resumed["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-6)


def test_a_sequence_the_chunks_do_not_divide_is_refused_naming_the_fix(tmp_path):
    run = run_script("train_gpt.py", tmp_path, *CP2_RUN, "--seq-len", "30", "--max-steps", "1")
    assert run.returncode != 0
    assert "a sequence of 30 does not split into 2 x context_parallel_size = 4 equal chunks" in run.output


def test_a_hugging_face_llama_through_causal_lm_matches_one_process_split_and_with_tensor_parallelism(tmp_path):
    """Context 2, data 2 x context 2 (2 sequences per data-parallel rank), context 2 x tensor 2 (transformers' own tensor-parallel plan) and context 2 x pipeline 2 (2
    micro-batches; the stages get the whole sequence's position_ids as keyword inputs). No code: CausalLM shifts the labels over the whole sequence, passes global position_ids (rotary embeddings)
    and weighs each rank's loss by the whole batch's label count."""
    pytest.importorskip("transformers")
    llama = save_llama(tmp_path / "llama")

    def finetune(name, *layout):
        out = tmp_path / name
        result = assert_ok(
            run_script("finetune_hf.py", out, "--model", str(llama), *layout, "--max-steps", "4", "--dump")
        ).result()
        return result, load_file(str(out / "weights.safetensors"))

    single, single_weights = finetune("single", *FINETUNE_LAYOUTS["single"])
    layouts = {"cp2": (*CP2, "--batch-size", "4"), "cp2_tp2": (*CP2_TP2, "--batch-size", "4")}
    layouts |= {
        "cp2_pp2": (*CP2_PP2, "--batch-size", "4"),
        "dp2_cp2": ("--devices", "4", *CP2[2:], "--batch-size", "2"),
    }
    for name, layout in layouts.items():
        split, split_weights = finetune(name, *layout)
        assert split["losses"] == pytest.approx(single["losses"], abs=1e-5), name
        for key, tensor in split_weights.items():
            torch.testing.assert_close(tensor, single_weights[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_a_loop_on_the_engine_splits_through_forward_backward_and_a_bare_backward_is_refused(tmp_path):
    script = "engine_context_parallel.py"
    one = assert_ok(run_script(script, tmp_path / "one", "--devices", "1")).result()
    split = assert_ok(run_script(script, tmp_path / "cp2", "--devices", "2")).result()
    assert split["losses"] == pytest.approx(one["losses"], abs=1e-5) and len(one["losses"]) == 8
    bare = run_script(script, tmp_path / "bare", "--devices", "2", "--direct-backward")
    assert bare.returncode != 0
    assert "this backward ran on a step whose sequences were not split; run the step through" in bare.output
    dropout = run_script(script, tmp_path / "dropout", "--devices", "2", "--dropout", "0.1")
    assert dropout.returncode != 0
    assert "attention dropout under context parallelism on CPU" in dropout.output
