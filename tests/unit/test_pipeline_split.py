"""Pipeline stages cut from unchanged models, and the pipeline options refused before any process starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.gpt.model import GPT, GPTConfig, GPTModule
from shardtrain import ModelParallelStrategy, Trainer
from shardtrain.errors import ConfigError, StrategyError
from shardtrain.strategies import create_strategy
from shardtrain.strategies.deepspeed.config import check_config
from shardtrain.parallel.pipeline.schedule import schedule_class, stage_indices
from shardtrain.parallel.pipeline.split import StageRunner, keep_only, plan_stages


def _gpt(n_layer: int = 4, device: str = "meta") -> GPT:
    with torch.device(device):
        return GPT(GPTConfig(n_layer=n_layer, n_head=2, d_model=16, seq_len=8))


class DecoderLayer(nn.Module):
    """A Hugging Face-shaped layer: the hidden state first, then keyword arguments the model computes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        return hidden + torch.tanh(self.proj(hidden) + position_embeddings)


class Rotary(nn.Module):
    """No parameters: it runs on every stage."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.arange(hidden.shape[1], dtype=hidden.dtype).unsqueeze(-1) * 0.01


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(3))
        self.norm = nn.LayerNorm(8)
        self.rotary_emb = Rotary()  # registered after the layers, called before them

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(hidden)
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings=position_embeddings)
        return self.norm(hidden)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.tanh(self.proj(hidden))


class HandWrittenGPT(nn.Module):
    """GPT-2's learned positions as a bare parameter, written by hand: ``tok(idx) + pos[:, :T]``."""

    def __init__(self, seq_len: int = 8, width: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(32, width)
        self.pos = nn.Parameter(torch.randn(1, seq_len, width))
        self.blocks = nn.ModuleList(Block(width) for _ in range(4))
        self.head = nn.Linear(width, 32)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        batch, seq, width = x.shape  # a later stage reads the shape of what it computes from the stand-in
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ViT(nn.Module):
    """A class token and position embeddings as bare parameters, concatenated and added before the blocks."""

    def __init__(self, patches: int = 4, width: int = 8) -> None:
        super().__init__()
        self.patch = nn.Linear(12, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, width))
        self.blocks = nn.ModuleList(Block(width) for _ in range(3))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 5)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class FinalScale(HandWrittenGPT):
    """A bare parameter used after the blocks, which the first stage cannot own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(x * self.scale)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 32, (2, 8))


def _patches() -> torch.Tensor:
    return torch.randn(2, 4, 12)


class CausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Backbone()
        self.lm_head = nn.Linear(8, 32, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


def test_equal_runs_of_blocks_and_the_pieces_around_them() -> None:
    layout = plan_stages(_gpt(5), 2)
    assert layout.blocks == "blocks"
    assert layout.stages == (range(0, 3), range(3, 5))  # the first stages take the extra block
    assert layout.before == ("token_embedding", "position_embedding")
    assert layout.after == ("norm", "head")
    assert layout.owned(0) == ["token_embedding", "position_embedding", "blocks.0", "blocks.1", "blocks.2"]
    assert layout.owned(1) == ["blocks.3", "blocks.4", "norm", "head"]


def test_split_points_as_seen_from_the_train_module() -> None:
    layout = plan_stages(_gpt(4), 3, ["model.blocks.1", "model.blocks.3"], prefix="model.")
    assert layout.stages == (range(0, 1), range(1, 3), range(3, 4))


def test_nested_blocks_of_a_hugging_face_shaped_model() -> None:
    layout = plan_stages(CausalLM(), 2)
    assert layout.blocks == "model.layers"
    assert layout.before == ("model.embed_tokens",)
    assert set(layout.after) == {"model.norm", "lm_head"}  # rotary_emb has no parameters: every stage runs it


@pytest.mark.parametrize(
    "model_fn, inputs_fn",
    [(lambda: _gpt(4, "cpu"), _tokens), (CausalLM, _tokens), (HandWrittenGPT, _tokens), (ViT, _patches)],
    ids=["gpt", "hugging-face-shaped", "bare-position-parameter", "vit-class-token"],
)
@pytest.mark.parametrize("num_stages", [2, 3])
def test_stages_run_in_a_chain_compute_the_model_forward(model_fn, inputs_fn, num_stages) -> None:
    torch.manual_seed(0)
    model = model_fn()
    inputs = inputs_fn()
    expected = model(inputs)
    expected.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    layout = plan_stages(model, num_stages)
    activation: tuple[torch.Tensor, ...] = (inputs,)
    for stage in range(num_stages):
        activation = (StageRunner(model, layout, stage)(*activation, pipeline_inputs=(inputs,)),)
    torch.testing.assert_close(activation[0], expected, rtol=0, atol=0)
    activation[0].square().sum().backward()  # through every stage, as the schedule's sends and receives do
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=0, msg=name)
    assert model(inputs).equal(expected), "the views must leave the model itself unchanged"


def test_a_view_shares_the_model_s_own_modules() -> None:
    model = _gpt(4, "cpu")
    runner = StageRunner(model, plan_stages(model, 2), 1)
    assert runner.view.blocks[3].block is model.blocks[3]
    assert runner.view.blocks[2].block is model.blocks[2]  # the stage's first block reads what it receives
    assert runner.view.head is model.head
    assert {id(p) for p in runner.parameters()} == {
        id(p) for name, p in model.named_parameters() if not name.startswith(("blocks.0.", "blocks.1.", "token", "pos"))
    } | {id(model.head.weight)}


@pytest.mark.parametrize(
    "points, message",
    [
        (
            ["model.blocks.9"],
            r"unknown pipeline split point 'model.blocks.9': split points name blocks of model.blocks",
        ),
        (["model.norm"], r"pipeline split point 'model.norm' is not a block of an nn.ModuleList"),
        (["model.blocks.0"], r"must name blocks in increasing order, after the first"),
    ],
)
def test_split_points_that_cannot_work(points, message) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_stages(_gpt(4), len(points) + 1, points, prefix="model.")


def test_more_stages_than_blocks() -> None:
    with pytest.raises(ConfigError, match=r"4 pipeline stages but the model has 2 blocks \(model.blocks\)"):
        plan_stages(_gpt(2), 4, prefix="model.")


class LateHead(CausalLM):
    """The output layer registered before the backbone, though the forward runs it last."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.lm_head = nn.Linear(8, 32, bias=False)
        self.model = Backbone()


def test_a_forward_that_runs_modules_out_of_their_registration_order_is_refused() -> None:
    model = LateHead()
    layout = plan_stages(model, 2)
    assert layout.before == ("lm_head", "model.embed_tokens")
    tokens = torch.randint(0, 32, (2, 8))
    hidden = StageRunner(model, layout, 0)(tokens, pipeline_inputs=(tokens,))  # lm_head's copy on stage 0 never runs
    with pytest.raises(ConfigError, match=r"a module registered before the blocks \(lm_head\) runs after them"):
        StageRunner(model, layout, 1)(hidden, pipeline_inputs=(tokens,))


@pytest.mark.parametrize("model_fn, names", [(HandWrittenGPT, ("pos",)), (ViT, ("cls_token", "pos_embed"))])
def test_parameters_held_beside_the_blocks_belong_to_the_first_stage(model_fn, names) -> None:
    model = model_fn()
    layout = plan_stages(model, 2)
    assert layout.parameters == names
    assert layout.owned(0)[: len(names)] == list(names) and not set(names) & set(layout.owned(1))
    first, second = (StageRunner(model, layout, stage) for stage in range(2))
    held = {id(getattr(model, name)) for name in names}
    assert held <= {id(p) for p in first.parameters()}  # FSDP over the first stage shards them
    assert not held & {id(p) for p in second.parameters()}
    replacement = nn.Parameter(torch.zeros_like(getattr(model, names[0])))
    model._parameters[names[0]] = replacement  # as FSDP and the initialisation replace them
    assert getattr(first.view, names[0]) is replacement, "the first stage's view reads the model's own"
    keep_only(model, set(layout.owned(1)), layout)  # a rank that holds only the second stage
    assert not set(names) & set(model.state_dict()) and not set(names) & {n for n, _ in model.named_parameters()}


def test_parameters_held_beside_nested_blocks_keep_their_names() -> None:
    model = CausalLM()
    model.model.scale = nn.Parameter(torch.ones(1))
    layout = plan_stages(model, 2)
    assert layout.parameters == ("model.scale",)
    kept = CausalLM()
    kept.model.scale = nn.Parameter(torch.ones(1))
    keep_only(kept, set(layout.owned(0)), layout)
    assert "model.scale" in kept.state_dict()


def test_a_parameter_held_beside_the_blocks_and_used_after_them_is_refused() -> None:
    model = FinalScale()
    layout = plan_stages(model, 2)
    tokens = _tokens()
    hidden = StageRunner(model, layout, 0)(tokens, pipeline_inputs=(tokens,))
    with pytest.raises(
        ConfigError,
        match=r"scale, a parameter held beside the blocks, belongs to the first pipeline stage, but the model's "
        r"forward uses it in or after the blocks on stage 1.*move scale into a submodule .*registered after the blocks",
    ):
        StageRunner(model, layout, 1)(hidden, pipeline_inputs=(tokens,))


def test_schedules_by_name_and_stage_placement() -> None:
    assert schedule_class("GPipe").__name__ == "ScheduleGPipe"
    assert schedule_class("interleaved_1f1b").__name__ == "ScheduleInterleaved1F1B"
    assert schedule_class("ZBV-zero-bubble").__name__ == "ScheduleZBVZeroBubble"
    assert stage_indices(1, 4, 2, schedule_class("interleaved_1f1b")) == [1, 5]
    assert stage_indices(1, 4, 2, schedule_class("zbv_zero_bubble")) == [1, 6]
    with pytest.raises(StrategyError, match=r"unknown pipeline_schedule 'chimera'; torch.distributed.pipelining has"):
        ModelParallelStrategy(pipeline_parallel_size=2, pipeline_schedule="chimera")


def test_options_that_do_not_fit_the_schedule() -> None:
    with pytest.raises(StrategyError, match=r"'interleaved_1f1b' runs several stages per rank"):
        ModelParallelStrategy(
            pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b", pipeline_split_points=["a.1"]
        )
    with pytest.raises(StrategyError, match=r"'1f1b' runs one stage per rank but pipeline_split_points makes 2"):
        ModelParallelStrategy(pipeline_parallel_size=2, pipeline_split_points=["a.1", "a.2", "a.3"])
    with pytest.raises(
        StrategyError, match=r"'1f1b' needs at least one micro-batch per stage: microbatches=1 is fewer"
    ):
        ModelParallelStrategy(pipeline_parallel_size=2, microbatches=1)
    with pytest.raises(StrategyError, match=r"cpu_offload with pipeline_parallel_size > 1 is not supported yet"):
        ModelParallelStrategy(pipeline_parallel_size=2, cpu_offload=True).make_parallel_dims(4, 4)
    with pytest.raises(StrategyError, match=r"microbatches must be a whole number >= 1, got 0"):
        ModelParallelStrategy(pipeline_parallel_size=2, microbatches=0)


def _loader(batch_size: int) -> DataLoader:
    tokens = torch.zeros(16, 8, dtype=torch.long)
    return DataLoader(TensorDataset(tokens, tokens), batch_size=batch_size)


def _fit(strategy: ModelParallelStrategy, n_layer: int = 2, batch_size: int = 4, devices: int = 2) -> None:
    module = GPTModule(GPTConfig(n_layer=n_layer, n_head=2, d_model=16, seq_len=8))
    Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1).fit(module, _loader(batch_size))


def test_bad_input_is_refused_before_any_process_starts() -> None:
    """(A batch that does not divide into the micro-batches is refused once the processes start, before
    training: tests/distributed/test_pipeline_parallel.py.)"""
    with pytest.raises(ConfigError, match=r"unknown pipeline split point 'model.blocks.7'"):
        _fit(ModelParallelStrategy(pipeline_parallel_size=2, pipeline_split_points=["model.blocks.7"]))
    with pytest.raises(ConfigError, match=r"4 pipeline stages but the model has 2 blocks"):
        _fit(ModelParallelStrategy(pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b"))
    with pytest.raises(StrategyError, match=r"pipeline_parallel_size=2 does not divide the 3 ranks"):
        _fit(ModelParallelStrategy(pipeline_parallel_size=2), devices=3)


def test_a_module_without_the_pipeline_contract_is_refused() -> None:
    class OwnStep(GPTModule):
        pipeline_inputs = None

        def training_step(self, batch, batch_idx):
            return self.pipeline_loss(self(batch[0]), batch[1])

    with pytest.raises(
        ConfigError, match=r"needs OwnStep to define pipeline_inputs\(batch\) .*missing: pipeline_inputs"
    ):
        Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(pipeline_parallel_size=2)).fit(
            OwnStep(GPTConfig(n_layer=2, n_head=2, d_model=16, seq_len=8)), _loader(4)
        )


def test_pipeline_parallelism_asked_of_other_strategies() -> None:
    with pytest.raises(StrategyError, match=r"strategy 'fsdp' has no pipeline parallelism .*strategy='model_parallel'"):
        create_strategy("fsdp", pipeline_parallel_size=2)
    with pytest.raises(ConfigError, match=r"asks for pipeline parallelism .*deepspeed PipelineModule.*model_parallel"):
        check_config({"pipeline": {"stages": 2}, "zero_optimization": {"stage": 1}})


def test_the_default_steps_of_the_contract_train_without_pipeline_parallelism() -> None:
    torch.manual_seed(0)
    module = GPTModule(GPTConfig(n_layer=2, n_head=2, d_model=16, seq_len=8))
    module.configure_model()
    module.model = module.model.to_empty(device="cpu")
    module.model.init_weights()
    tokens = torch.randint(0, 256, (2, 8))
    loss = module.training_step((tokens, tokens), 0)
    expected = nn.functional.cross_entropy(module.model(tokens).reshape(-1, 256), tokens.reshape(-1))
    assert loss.item() == pytest.approx(expected.item())
    assert module.pipelined_model()[0] == "model"
