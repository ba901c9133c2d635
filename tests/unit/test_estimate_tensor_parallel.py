"""The ``model_parallel`` row of the memory estimate: one tensor-parallel rank's share, measured on
the meta device, then FSDP over the data-parallel ranks; and attention counted as fused kernels keep it.

Against real runs over gloo: ``tests/distributed/test_estimate_vs_measured.py``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from examples.gpt.model import GPT, GPTConfig, GPTModule
from shardtrain import ConfigError, TrainModule
from shardtrain.estimate.table import estimate_memory
from shardtrain.estimate.footprint import measure_footprint
from shardtrain.parallel.tensor_parallel.plan import FoundPlan, plan_targets

CONFIG = GPTConfig(n_layer=2, d_model=64, n_head=4, seq_len=32, vocab_size=256)


def _split_parameter_bytes(config: GPTConfig) -> int:
    """Bytes of the tensors the GPT's plan splits: the (tied) vocabulary embedding, and per block the
    qkv and up projections (weight and bias) and the proj and down weights (their biases are whole)."""
    d, v, bias = config.d_model, config.vocab_size, int(config.bias)
    per_block = (3 * d * d + 3 * d * bias) + d * d + (4 * d * d + 4 * d * bias) + 4 * d * d
    return 4 * (v * d + config.n_layer * per_block)


def test_one_rank_holds_half_of_what_the_plan_splits_and_all_of_the_rest() -> None:
    footprint = measure_footprint(GPTModule(CONFIG), devices=2, tensor_parallel_size=2, batch_size=2)
    share = footprint.tensor_parallel
    assert share is not None and share.tensor_parallel_size == 2
    split = _split_parameter_bytes(CONFIG)
    assert share.parameter_bytes == footprint.parameter_bytes - split // 2
    assert share.optimizer_bytes == 2 * share.parameter_bytes  # AdamW's two moments of the rank's tensors
    assert share.largest_unit_bytes < 0.51 * footprint.largest_unit_bytes  # a block is split but for its norms
    assert 0 < share.activation_bytes < footprint.activation_bytes


def test_the_2d_row_is_fsdp_over_the_data_parallel_ranks_of_the_share() -> None:
    estimate = estimate_memory(GPTModule(CONFIG), devices=4, tensor_parallel_size=2, batch_size=2)
    share = measure_footprint(GPTModule(CONFIG), devices=4, tensor_parallel_size=2, batch_size=2).tensor_parallel
    row = estimate.get("model_parallel")
    assert estimate.tensor_parallel_size == 2
    assert (row.parameters, row.optimizer) == (share.parameter_bytes // 2, share.optimizer_bytes // 2)
    assert row.working == 2 * share.largest_unit_bytes  # two of the share's units gathered over data parallel
    assert row.activations == share.activation_bytes
    assert "model_parallel: tensor parallel 2 x data parallel 2" in str(estimate).splitlines()[0]
    one_group = estimate_memory(GPTModule(CONFIG), devices=2, batch_size=2).get("model_parallel")  # tp = 2, dp = 1
    assert one_group.parameters == share.parameter_bytes and one_group.working == 0


def test_auto_picks_tensor_parallelism_where_fsdp_does_not_fit_and_offload_where_nothing_does() -> None:
    config = GPTConfig(n_layer=2, d_model=64, n_head=4, seq_len=256, vocab_size=256)  # activations dominate
    estimate = estimate_memory(GPTModule(config), devices=2, batch_size=8)
    fsdp, split = estimate.get("fsdp").device_total, estimate.get("model_parallel").device_total
    assert split < fsdp
    assert estimate.recommend(int((fsdp + split) / 2 / 0.9))[0] == "model_parallel"
    assert estimate.recommend(int(fsdp / 0.9) + 1)[0] == "fsdp"
    assert estimate.recommend(1)[0] == "fsdp_cpu_offload"


def test_a_model_without_a_plan_has_no_row_unless_a_degree_is_asked_for() -> None:
    class NoPlan(TrainModule):
        def configure_model(self) -> None:
            self.layer = nn.Linear(8, 8)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

    rows = {row.strategy for row in estimate_memory(NoPlan(), devices=2).strategies}
    assert "model_parallel" not in rows and "fsdp" in rows
    with pytest.raises(
        ConfigError, match=r"tensor_parallel_size=2 but NoPlan has no tensor-parallel plan: pass tp_plan"
    ):
        estimate_memory(NoPlan(), devices=2, tensor_parallel_size=2)
    planned = estimate_memory(NoPlan(), devices=2, tensor_parallel_size=2, tp_plan={"layer": "colwise"})
    assert planned.get("model_parallel").parameters == (8 * 8 + 8) * 4 // 2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"devices": 4, "tensor_parallel_size": 3}, r"tensor_parallel_size=3 does not divide the 4 ranks"),
        ({"devices": 2, "tensor_parallel_size": 0}, r"tensor_parallel_size must be a whole number >= 1, got 0"),
    ],
)
def test_a_degree_that_does_not_fit_the_run_is_refused(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        estimate_memory(GPTModule(CONFIG), **options)


def test_heads_that_do_not_divide_are_refused_naming_the_numbers() -> None:
    three_heads = GPTConfig(n_layer=1, d_model=24, n_head=3, seq_len=8)
    with pytest.raises(ConfigError, match=r"n_head = 3 is not divisible by tensor_parallel_size=2"):
        estimate_memory(GPTModule(three_heads), devices=2, tensor_parallel_size=2)
    assert "model_parallel" not in {
        row.strategy for row in estimate_memory(GPTModule(three_heads), devices=2).strategies
    }


def test_a_split_style_on_a_module_that_is_not_linear_or_embedding_is_refused() -> None:
    model = GPTModule(CONFIG)
    model.configure_model()
    with pytest.raises(ConfigError, match=r"gives 'blocks.0.attn', a CausalSelfAttention, the style ColwiseParallel"):
        plan_targets(FoundPlan(model.model, {"blocks.*.attn": "colwise"}, "a test"))


def test_attention_is_counted_as_the_fused_kernels_keep_it() -> None:
    """The estimate's activations equal what a real step on CPU saves for backward, counted alike
    (each tensor once, parameters not): no attention matrix, as the fused SDPA kernel keeps none."""
    config = GPTConfig(n_layer=2, d_model=64, n_head=4, seq_len=128, vocab_size=256)
    estimated = measure_footprint(GPTModule(config), batch_size=2).activation_bytes
    module = GPTModule(config)
    module.model = GPT(config)  # on the CPU, with real kernels
    parameters = {id(p) for p in module.parameters()}
    saved: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:
            saved[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())
        return tensor

    batch = module.example_batch(2)
    real = tuple(torch.randint(0, config.vocab_size, t.shape) for t in batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module.training_step(real, 0)
    assert estimated == sum(nbytes for _, nbytes in saved.values())


def test_a_hugging_face_llama_is_estimated_from_its_own_plan() -> None:
    transformers = pytest.importorskip("transformers", reason="install the extra: pip install 'shardtrain[hf]'")
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )

    def factory() -> nn.Module:
        return transformers.LlamaForCausalLM(config)

    footprint = measure_footprint(factory, devices=2, tensor_parallel_size=2)
    share = footprint.tensor_parallel
    norms = 4 * 64 * (2 * 2 + 1)  # two RMSNorms per layer and the final one stay whole
    assert share.parameter_bytes == (footprint.parameter_bytes - norms) // 2 + norms
    with pytest.raises(ConfigError, match=r"num_key_value_heads = 2 is not divisible by tensor_parallel_size=4"):
        measure_footprint(factory, devices=4, tensor_parallel_size=4)


def test_the_cli_takes_the_degree_and_prints_the_same_row(capsys) -> None:
    from shardtrain.cli import main
    from tests.distributed.runner import ROOT

    config = ROOT / "tests" / "distributed" / "configs" / "tiny.yaml"  # GPT 2 x 64, 2 heads, batch 4
    assert main(["estimate", "--config", str(config), "--devices", "4", "--tensor-parallel", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    estimate = estimate_memory(
        GPTModule(GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=32)),
        devices=4,
        tensor_parallel_size=2,
        batch_size=4,
    )
    row = next(row for row in printed["strategies"] if row["strategy"] == "model_parallel")
    assert printed["tensor_parallel_size"] == 2
    assert row["device_total"] == estimate.get("model_parallel").device_total


def test_a_model_that_cannot_be_copied_has_no_row_unless_a_degree_is_asked_for() -> None:
    """The share is measured on a copy of the meta model; a module holding a lock cannot be copied."""
    import threading

    class Locked(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()

        def configure_model(self) -> None:
            self.layer = nn.Linear(8, 8)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

    rows = {row.strategy for row in estimate_memory(Locked(), devices=2, tp_plan={"layer": "colwise"}).strategies}
    assert "model_parallel" not in rows and "ddp" in rows
    with pytest.raises(ConfigError, match=r"measuring one tensor-parallel rank's share .* cannot pickle"):
        estimate_memory(Locked(), devices=2, tensor_parallel_size=2, tp_plan={"layer": "colwise"})


def test_sequence_parallelism_keeps_the_norms_activations_cut_and_the_logits_whole() -> None:
    """The share follows the sequence-parallel plan's layouts: a step saves less than under the plain
    plan (norms and residuals hold half the sequence), parameters are the same, and the output is whole."""
    plain = measure_footprint(GPTModule(CONFIG), devices=2, tensor_parallel_size=2, batch_size=2).tensor_parallel
    sequence = measure_footprint(
        GPTModule(CONFIG), devices=2, tensor_parallel_size=2, batch_size=2, sequence_parallel=True
    ).tensor_parallel
    assert sequence.parameter_bytes == plain.parameter_bytes
    assert sequence.activation_bytes < plain.activation_bytes
    # What sequence parallelism cuts: per block, the two norms' inputs (batch x seq x d) and their
    # statistics (batch x seq each); and the final norm's. Half of each stays on the rank.
    b, s, d = 2, CONFIG.seq_len, CONFIG.d_model
    per_norm = 4 * (b * s * d + 2 * b * s)
    assert plain.activation_bytes - sequence.activation_bytes == (2 * CONFIG.n_layer + 1) * per_norm // 2

    from shardtrain.parallel.tensor_parallel.plan import find_plan
    from shardtrain.parallel.tensor_parallel.share import narrow_to_one_rank

    module = GPTModule(CONFIG)
    with torch.device("meta"):
        module.configure_model()
    narrow_to_one_rank(find_plan(module, None, sequence_parallel=True), 2)
    assert module(torch.zeros(b, s, dtype=torch.long, device="meta")).shape == (b, s, CONFIG.vocab_size)
