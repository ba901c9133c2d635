"""The GPT example's mixture-of-experts feed-forward layer: a top-k router, experts stored as 3-D tensors and run
as grouped matmuls, an optional shared expert, and a load-balancing auxiliary loss.

The experts follow Hugging Face transformers' MoE experts interface (Mixtral, Qwen-MoE):
``experts(hidden_states [tokens, d], top_k_index [tokens, k], top_k_weights [tokens, k])`` returns each token's
weighted sum of its experts' outputs, and every parameter has the experts along its first dimension. That is
the layer ``ModelParallelStrategy(expert_parallel_size=N)`` recognises and divides between ranks
(``shardtrain.parallel.expert_parallel``); nothing here knows about ranks.

The auxiliary loss is the sequence-wise balance loss of DeepSeek-V3: for each sequence, ``num_experts`` x the
sum over experts of (the share of its tokens' k choices that went to the expert) x (the expert's mean routing
probability over its tokens), averaged over the sequences. It is 1 when the router spreads the tokens evenly, and
grows as it favours some experts. Being a mean over sequences, it is the same whether one process sees the whole
batch or data-parallel ranks see parts of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """``num_experts`` GELU MLPs with their weights stacked: ``up`` is ``[num_experts, hidden, d_model]``,
    ``down`` ``[num_experts, d_model, hidden]``. The tokens routed to each expert are grouped and each group
    multiplied by its expert's weights in one ``torch._grouped_mm`` per layer."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, n_layer: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.n_layer = n_layer
        self.up = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, hidden))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.up, std=0.02)
        nn.init.normal_(self.down, std=0.02 / math.sqrt(2 * self.n_layer))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        k = top_k_index.shape[1]
        choices = top_k_index.reshape(-1)
        order = choices.argsort(stable=True)
        token = order // k
        # The experts this module holds: all of them, or under expert parallelism this rank's (the first dimension).
        counts = expert_counts(choices, self.up.shape[0])
        offsets = counts.cumsum(0).to(torch.int32)
        grouped = hidden_states[token]
        hidden = F.gelu(grouped_mm(grouped, self.up.transpose(-2, -1), offsets))
        out = grouped_mm(hidden, self.down.transpose(-2, -1), offsets)
        out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(hidden_states).index_add(0, token, out.to(hidden_states.dtype))


class Router(nn.Module):
    """Scores each token against every expert, keeps the ``top_k`` best, and weighs them by their softmax
    probabilities renormalised over the chosen ``top_k`` (Mixtral's router)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities ``[tokens, experts]``, top-k weights ``[tokens, k]``, top-k experts ``[tokens, k]``)."""
        probs = F.softmax(self.gate(hidden_states).float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        return probs, weights / weights.sum(dim=-1, keepdim=True), index


class MoE(nn.Module):
    """Routed experts, plus a shared expert every token goes through when ``shared_expert`` is set.

    After each forward, ``aux_loss`` holds the layer's balance loss (a scalar in the graph) and
    ``tokens_per_expert`` how many of this forward's token choices went to each expert (no gradient)."""

    def __init__(
        self, d_model: int, hidden: int, n_layer: int, num_experts: int, top_k: int, shared_expert: bool
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
        self.router = Router(d_model, num_experts, top_k)
        self.experts = Experts(num_experts, d_model, hidden, n_layer)
        self.shared = _SharedExpert(d_model, hidden, n_layer) if shared_expert else None
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        flat = x.reshape(-1, d_model)
        probs, weights, index = self.router(flat)
        out = self.experts(flat, index, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        self.aux_loss = sequence_balance_loss(probs.view(batch, seq, -1), index.view(batch, seq, -1))
        self.tokens_per_expert = expert_counts(index.reshape(-1), probs.shape[-1]).detach()
        return out.view(batch, seq, d_model)


class _SharedExpert(nn.Module):
    def __init__(self, d_model: int, hidden: int, n_layer: int) -> None:
        super().__init__()
        self.n_layer = n_layer
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.normal_(self.down.weight, std=0.02 / math.sqrt(2 * self.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm``: rows ``offsets[i-1]:offsets[i]`` times ``weights[i]``. On the meta device (where
    shardtrain's memory estimate runs a step) a matmul of the same shapes that saves the same rows for backward:
    ``_grouped_mm``'s meta kernel takes bf16 only."""
    if rows.is_meta:
        return rows @ weights[0]
    return torch._grouped_mm(rows, weights, offs=offsets)


def expert_counts(choices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of ``choices`` (expert indices) name each expert (``bincount``, written so that it also runs on the
    meta device, where shardtrain's memory estimate runs a step)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=choices.device)
    return counts.scatter_add_(0, choices, torch.ones_like(choices))


def sequence_balance_loss(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over the sequences: ``probs`` ``[batch, seq, experts]``,
    ``index`` ``[batch, seq, k]`` the chosen experts."""
    num_experts, choices = probs.shape[-1], index.shape[1] * index.shape[2]
    counts = torch.zeros(probs.shape[0], num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(
        1, index.reshape(probs.shape[0], -1), torch.ones_like(index.reshape(probs.shape[0], -1), dtype=probs.dtype)
    )
    share = counts / choices  # per sequence: the share of its token choices each expert got
    return (num_experts * (share * probs.mean(dim=1)).sum(dim=-1)).mean()
