"""A GPT-style decoder, readable top to bottom: pre-norm blocks, causal attention through
``scaled_dot_product_attention``, a GELU MLP, tied input/output embeddings.

``GPTModule`` is the shardtrain ``TrainModule`` around it: layers are created in
``configure_model()`` so that sharding strategies can build them on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import shardtrain
from examples.gpt.moe import MoE


@dataclass(kw_only=True, slots=True)
class GPTConfig:
    vocab_size: int = 256  # bytes
    seq_len: int = 256
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 256
    dropout: float = 0.0
    bias: bool = False
    #: Mixture of experts (``examples/gpt/moe.py``): with ``n_experts > 0`` each block's MLP is ``n_experts`` MLPs
    #: of which a router picks ``top_k`` per token (plus a shared one every token uses if ``shared_expert``), and
    #: the loss includes ``router_aux_loss_coef`` x the router's balance loss. Bias is not used by the experts.
    n_experts: int = 0
    top_k: int = 2
    shared_expert: bool = False
    router_aux_loss_coef: float = 0.01

    @property
    def num_parameters(self) -> int:
        """Parameters of the model built from this config (tied embeddings counted once)."""
        return self._parameters(self.n_experts)

    @property
    def active_parameters(self) -> int:
        """Parameters a token goes through: with experts, its ``top_k`` experts' rather than all of them."""
        return self._parameters(self.top_k) if self.n_experts else self.num_parameters

    def _parameters(self, experts: int) -> int:
        d, layers = self.d_model, self.n_layer
        norm = 2 * d if self.bias else d
        if self.n_experts:  # experts' MLPs 8d² each (no bias), the shared expert's, the router's d x n_experts
            mlp = experts * 8 * d * d + (8 * d * d if self.shared_expert else 0) + self.n_experts * d
            bias = 4 * d if self.bias else 0  # attention's
        else:
            mlp, bias = 8 * d * d, (9 * d if self.bias else 0)
        per_block = 4 * d * d + mlp + bias + 2 * norm  # attention 4d², the MLP, two norms
        return self.vocab_size * d + self.seq_len * d + layers * per_block + norm

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), the usual 6N + attention estimate (N: the parameters a
        token goes through)."""
        return 6 * self.active_parameters + 12 * self.n_layer * self.d_model * self.seq_len


class CausalSelfAttention(nn.Module):
    """Causal self-attention with one fused query/key/value projection.

    The projection's output is laid out head by head (query, key and value of head 0, then of
    head 1, ...), so that splitting its rows between tensor-parallel ranks gives each rank whole
    heads. Head counts are read from the tensors (``-1`` in ``view``), not from the config, so the
    same code runs on all heads or on a rank's share of them.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.d_model % config.n_head == 0, "d_model must be divisible by n_head"
        self.head_dim = config.d_model // config.n_head
        self.n_layer = config.n_layer
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def reset_parameters(self) -> None:
        _init_linear(self.qkv, std=0.02)
        _init_linear(self.proj, std=0.02 / math.sqrt(2 * self.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, -1, 3, self.head_dim).unbind(dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_layer = config.n_layer
        self.up = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.down = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)

    def reset_parameters(self) -> None:
        _init_linear(self.up, std=0.02)
        _init_linear(self.down, std=0.02 / math.sqrt(2 * self.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """One transformer block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is a mixture of experts when the
    config has experts."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp: nn.Module = MLP(config)
        if config.n_experts:
            d, layers = config.d_model, config.n_layer
            self.mlp = MoE(d, 4 * d, layers, config.n_experts, config.top_k, config.shared_expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class GPT(nn.Module):
    #: How tensor parallelism splits this model (``strategy="model_parallel"`` reads it; see
    #: ``shardtrain.parallel.tensor_parallel.plan``). Attention heads and the MLP's hidden units are split
    #: between the ranks: ``colwise`` layers produce a rank's share, ``rowwise`` ones sum the
    #: shares. The vocabulary is split in the embedding and the tied output layer (both keep rows
    #: of the one weight), and the logits are gathered whole for the loss.
    tp_plan = {
        "token_embedding": "embedding_rowwise",
        "blocks.*.attn.qkv": "colwise",
        "blocks.*.attn.proj": "rowwise",
        "blocks.*.mlp.up": "colwise",
        "blocks.*.mlp.down": "rowwise",
        "head": "colwise_rep",
    }
    #: The same split with sequence parallelism (``ModelParallelStrategy(sequence_parallel=True)``):
    #: between the split layers, the residual stream and the norms hold ``seq_len / tp`` positions
    #: per rank. The first block cuts the (whole) embedding sum along the sequence; each attention
    #: and MLP gathers its input whole and its last layer sums into sequence shards
    #: (reduce-scatter); the output layer gathers the final norm's shards.
    sequence_parallel_tp_plan = {
        "token_embedding": "embedding_rowwise",
        "blocks.0": "split_sequence",
        "blocks.*.norm1": "sequence_parallel",
        "blocks.*.attn": "gather_sequence",
        "blocks.*.attn.qkv": "colwise",
        "blocks.*.attn.proj": "rowwise_sequence",
        "blocks.*.norm2": "sequence_parallel",
        "blocks.*.mlp": "gather_sequence",
        "blocks.*.mlp.up": "colwise",
        "blocks.*.mlp.down": "rowwise_sequence",
        "norm": "sequence_parallel",
        "head": "colwise_rep_sequence",
    }

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        if config.n_experts:
            # The experts are not split by tensor parallelism (expert parallelism divides them between ranks); a
            # shared expert is split as the dense MLP is. Sequence parallelism has no plan for the experts' layer.
            dense_mlp = ("blocks.*.mlp.up", "blocks.*.mlp.down")
            self.tp_plan = {k: v for k, v in self.tp_plan.items() if k not in dense_mlp}
            if config.shared_expert:
                self.tp_plan |= {"blocks.*.mlp.shared.up": "colwise", "blocks.*.mlp.shared.down": "rowwise"}
            self.sequence_parallel_tp_plan = None
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.d_model, bias=config.bias)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied
        if not self.head.weight.is_meta:
            self.init_weights()

    def reset_parameters(self) -> None:
        """This module's own parameters; blocks initialise theirs (so FSDP can init one unit at a time)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def init_weights(self) -> None:
        """GPT-2 initialisation: every module's ``reset_parameters()``, children first.

        This is the order shardtrain materialises a model built on the meta device in, so a
        model built on the meta device and one built here from the same seed state agree.
        """

        def visit(module: nn.Module) -> None:
            for child in module.children():
                visit(child)
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

        visit(self)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        # arange(seq) on one device; under context parallelism the positions of this rank's part of the sequence
        if positions is None:
            positions = shardtrain.sequence_positions(tokens.shape[1], tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def moe_layers(self) -> list[MoE]:
        """The blocks' mixture-of-experts layers (none in a dense model)."""
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def router_aux_loss(self) -> torch.Tensor:
        """The mean over the MoE layers of their last forward's balance loss (``examples/gpt/moe.py``)."""
        losses = [layer.aux_loss for layer in self.moe_layers() if layer.aux_loss is not None]
        return torch.stack(losses).mean()


class GPTModule(shardtrain.TrainModule):
    """Next-byte prediction with AdamW and a warm-up then cosine learning-rate schedule."""

    def __init__(
        self,
        config: GPTConfig | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        self.config = config or GPTConfig()
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.model: GPT | None = None

    def hparams(self) -> dict:
        return {**asdict(self.config), "learning_rate": self.learning_rate, "weight_decay": self.weight_decay}

    def example_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of the right shape, for memory estimation (``shardtrain.estimate_memory``)."""
        tokens = torch.zeros(batch_size, self.config.seq_len, dtype=torch.long)
        return tokens, tokens

    def configure_model(self) -> None:
        # Built on the meta device whatever the strategy: no memory is allocated here, and the
        # strategy materialises it (sharded, for FSDP) with the same initialisation everywhere.
        if self.model is None:
            with torch.device("meta"):
                self.model = GPT(self.config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    @torch.no_grad()
    def generate(self, prompt: bytes, max_new_bytes: int, temperature: float = 0.8, seed: int = 0) -> bytes:
        """Continue ``prompt`` byte by byte, sampling from a seeded generator; returns the new bytes.

        nanoGPT's simple loop: no KV cache, the context cropped to ``seq_len``, one full forward
        per byte. In a fit, each forward goes through the strategy's wrapper (``trainer.model``):
        under FSDP every rank holds only shards and the wrapper's forward gathers them, so every
        rank must call this with the same arguments; the seeded generator makes them draw the
        same bytes. ``temperature=0`` picks the most likely byte.
        """
        was_training = self.training
        self.eval()
        trainer = self._trainer
        wrapped = trainer.model if trainer is not None and trainer.model is not None else self
        device = trainer.engine.device if trainer is not None else self.device
        tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        # Sequence parallelism splits the sequence between the tensor-parallel ranks: the context is
        # padded at its end to a multiple of them, which changes none of the earlier positions' logits (causal).
        mesh = self.device_mesh
        multiple = mesh["tp"].size() if mesh is not None and "tp" in (mesh.mesh_dim_names or ()) else 1
        for _ in range(max_new_bytes):
            context = tokens[:, -self.config.seq_len :]
            padded = F.pad(context, (0, -context.shape[1] % multiple))
            logits = wrapped(padded)[:, context.shape[1] - 1, :].float()
            if hasattr(logits, "full_tensor"):  # split by vocabulary (ModelParallelStrategy(loss_parallel=True))
                logits = logits.full_tensor()
            if temperature == 0:
                next_byte = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                next_byte = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, next_byte], dim=1)
        self.train(was_training)
        return bytes(tokens[0, len(prompt) :].tolist())

    # The pipeline contract. With these two hooks and no training_step or validation_step, TrainModule's
    # default steps compute pipeline_loss(self.model(inputs), targets) and log val_loss under every
    # strategy, and pipeline parallelism runs the same loss per micro-batch on its last stage.
    def pipeline_inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        return inputs, targets

    def pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next byte; with experts, plus ``router_aux_loss_coef`` x the routers' balance loss
        (as transformers' MoE models add theirs)."""
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        if self.config.n_experts and self.config.router_aux_loss_coef:
            loss = loss + self.config.router_aux_loss_coef * self.model.router_aux_loss()
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The pipeline contract's loss; with experts, the routers' statistics are logged beside it (synced, in the
        Trainer's one collective per reduction when metrics are written): ``moe_aux_loss``, the balance loss (1 when
        the tokens are spread evenly), and ``moe_expert{e}_share``, the share of the token choices expert ``e`` got
        (mean over the MoE layers; ``1 / n_experts`` each when balanced)."""
        loss = super().training_step(batch, batch_idx)
        if self.config.n_experts:
            layers = self.model.moe_layers()
            self.log("moe_aux_loss", self.model.router_aux_loss().detach(), sync_dist=True)
            shares = torch.stack([layer.tokens_per_expert / layer.tokens_per_expert.sum() for layer in layers])
            for expert, share in enumerate(shares.float().mean(dim=0)):
                self.log(f"moe_expert{expert}_share", share, sync_dist=True)
        return loss

    # The context-parallel contract: the batch's tensors that run along the sequence, split over the cp ranks
    # before the step. The targets are the next bytes, shifted over the whole sequence before the split.
    def context_parallel_inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        inputs, targets = batch
        return [(inputs, 1), (targets, 1)]

    def configure_optimizers(self) -> dict:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.learning_rate,
            betas=(0.9, 0.95),
        )
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1000
        total = int(total) if math.isfinite(total) else 10_000
        warmup = max(1, min(self.warmup_steps, total // 2))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
