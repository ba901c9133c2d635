"""A ready ``TrainModule`` for Hugging Face causal language models, for run configs without Python."""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from shardtrain.errors import ConfigError
from shardtrain.hf.adapters import keep_frozen_in, parse_dtype, with_lora
from shardtrain.hf.pretrained import from_pretrained, require_transformers
from shardtrain.module import TrainModule
from shardtrain.parallel.context_parallel import in_split_step


class CausalLM(TrainModule):
    """Fine-tune (or train from a config) a transformers causal language model on its own loss.

    Args:
        model: a checkpoint directory (or a hub id in the local cache) for ``from_pretrained``.
        config_overrides: config values to change, e.g. ``{attn_implementation: sdpa}``.
        from_scratch: build the model from the checkpoint's config with fresh weights instead.
        learning_rate, weight_decay, betas: AdamW's; weight decay applies to matrices only.
        freeze: parameter-name patterns (``fnmatch``, e.g. ``"model.embed_tokens.*"``) kept fixed:
            they get no gradient and the optimizer holds none of their state.
        lora: train LoRA adapters instead of the model: peft's ``LoraConfig`` arguments, e.g.
            ``{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj], lora_dropout: 0.05}``
            (``pip install 'shardtrain[peft]'``). The pretrained weights stay frozen.
        frozen_dtype: keep the frozen weights (the base under ``lora``, ``freeze``'s) in this dtype, e.g.
            ``bf16``, while the trained ones stay in the run's parameter dtype (fp32 under ``32-true`` and
            ``bf16-mixed``): half the base's memory; the adapters and their optimizer state stay fp32.

    A batch is a dict with ``input_ids`` and ``labels`` (``-100`` where no loss is taken), as
    ``TextData`` and transformers' collators give; ``attention_mask`` is passed on when present.
    """

    def __init__(
        self,
        model: str,
        config_overrides: Mapping[str, Any] | None = None,
        from_scratch: bool = False,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        freeze: list[str] | None = None,
        lora: Mapping[str, Any] | None = None,
        frozen_dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.path = model
        self.config_overrides = dict(config_overrides or {})
        self.from_scratch = from_scratch
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.freeze = list(freeze or [])
        self.lora = dict(lora) if lora is not None else None
        if frozen_dtype is not None:
            parse_dtype(frozen_dtype, "frozen_dtype")  # a wrong name fails here, before any process starts
            if lora is None and not freeze:
                raise ConfigError("frozen_dtype applies to frozen weights, and none are: pass lora or freeze too")
        self.frozen_dtype = frozen_dtype
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.from_scratch:
            transformers = require_transformers()
            config = transformers.AutoConfig.from_pretrained(self.path, **self.config_overrides)
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.get_default_dtype())
        else:
            self.model = from_pretrained(self.path, **self.config_overrides)
        frozen = [n for n, p in self.model.named_parameters() if any(fnmatch.fnmatch(n, f) for f in self.freeze)]
        if self.freeze and not frozen:
            raise ConfigError(f"freeze={self.freeze} matches no parameter of {type(self.model).__name__}")
        for name, parameter in self.model.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)
        if self.lora is not None:
            self.model = with_lora(self.model, self.lora)
        if self.frozen_dtype is not None:
            keep_frozen_in(self.model, self.frozen_dtype)
        self.model.config.use_cache = False  # training keeps no key-value cache (an export keeps the source's config)

    # The pipeline contract (``model_parallel`` with ``pipeline_parallel_size``): the stages run the
    # transformers model's own forward on the token ids; the last one computes the model's own loss.
    pipeline_module = "model"

    def pipeline_inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], torch.Tensor]:
        if not in_split_step():
            return (batch["input_ids"],), batch["labels"]
        # Split over context-parallel ranks too (context_parallel_inputs ran): every stage computes the rotary
        # embeddings from the whole sequence's positions, and the loss needs each sequence's label count over the
        # whole sequence, carried beside the shifted labels (targets must be one tensor: [labels, counts] per row).
        keywords = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}
        labels = batch["shift_labels"]
        counts = batch["label_counts"][:, None].expand_as(labels)
        return (batch["input_ids"], keywords), torch.stack([labels, counts], dim=1)

    def pipeline_loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        # A ModelOutput (its logits come first without labels), or under pipeline parallelism the logits
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        vocab_size = self.model.config.vocab_size
        if not in_split_step():
            return self.model.loss_function(logits, labels, vocab_size=vocab_size)
        # This micro-batch's sum over the rank's tokens over its label count on the whole sequences, per rank: the
        # mean over the context-parallel ranks (FSDP's) is then the micro-batch's mean, as without the split.
        shifted, counts = labels[:, 0].contiguous(), labels[:, 1, 0]
        items = counts.sum() / self.device_mesh["cp"].size()
        return self.model.loss_function(
            logits, None, vocab_size=vocab_size, shift_labels=shifted, num_items_in_batch=items
        )

    # The context-parallel contract (``model_parallel`` with ``context_parallel_size``): the labels are shifted over
    # the whole sequence before the split (transformers' ``shift_labels``; a shift inside each rank's part would be
    # wrong at its edges), the positions are the whole sequence's (``position_ids``), and each rank's loss is its
    # sum over the whole batch's label count divided by the ranks (``num_items_in_batch``), so that the mean FSDP
    # takes over the ranks is the one-process loss even where the ranks hold different counts of labels.
    def context_parallel_inputs(self, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ConfigError(
                "context parallelism runs causal attention without a padding mask, and this batch pads: pack the "
                "sequences into full blocks (TextData does) or train without context_parallel_size"
            )
        tokens, labels = batch["input_ids"], batch["labels"]
        batch["shift_labels"] = F.pad(labels[:, 1:], (0, 1), value=-100)
        batch["position_ids"] = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens).contiguous()
        batch["label_counts"] = (batch["shift_labels"] != -100).sum(dim=1)  # per sequence, before the split
        batch["num_items_in_batch"] = batch["label_counts"].sum() / self.device_mesh["cp"].size()
        # An all-ones mask: transformers then calls attention with is_causal=True and no mask (the ring's case),
        # rather than reading the rank's non-contiguous positions as packed sequences and building a mask.
        batch["attention_mask"] = torch.ones_like(tokens)
        names = ("input_ids", "labels", "shift_labels", "position_ids", "attention_mask")
        return [(batch[name], 1) for name in names]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        names = ("input_ids", "attention_mask", "labels", "shift_labels", "position_ids", "num_items_in_batch")
        return self.model(**{k: batch[k] for k in names if k in batch}).loss

    def training_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)

    def validation_step(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.log("val_loss", self(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.learning_rate, betas=self.betas, weight_decay=self.weight_decay
        )
