"""Expert parallelism: a mixture-of-experts layer's experts divided between ranks, and each token sent to the
rank that holds its expert and back, by all-to-all.

**The layer it recognises** is the experts module of Hugging Face transformers' MoE models (Mixtral, Qwen-MoE, ...)
and of the GPT example (``examples/gpt/moe.py``): a module with an integer ``num_experts`` whose own parameters
all have the experts along their first dimension, called as ``experts(hidden_states [tokens, d], top_k_index
[tokens, k], top_k_weights [tokens, k])`` and returning each token's weighted sum of its experts' outputs
``[tokens, d]``. The router before it stays on every rank; nothing of the model is rewritten.

**What ``expert_parallel`` does to each such module** (``ExpertParallel``, a ``ParallelStyle`` applied through
PyTorch's ``distribute_module``, as torchtitan's is):

* its parameters become DTensors sharded along the experts (``Shard(0)``) over the ``ep`` mesh: rank ``i`` of an
  expert-parallel group of ``N`` holds experts ``i * E/N`` to ``(i + 1) * E/N - 1``;
* before its forward, each token's ``k`` choices are sorted by expert, the counts exchanged
  (``all_to_all_single``), and a copy of the token sent to each chosen expert's rank
  (``all_to_all_single_autograd`` with uneven splits); the module's own forward then runs on the tokens it
  received, with this rank's experts only (each received row names one local expert, weight 1);
* after it, the outputs go back the same way and each token's are weighed by its router weights and summed, on
  the token's own rank (so the router's gradient never crosses ranks).

The split sizes of the all-to-all must be known on the host: one device-to-host copy of the counts per layer and
step (a sync, as in every implementation with uneven splits: torchtitan, DeepSpeed, Megatron).

Gradients: an expert's gradient on its rank is the sum over every rank's tokens that reached it. The strategy
shards expert parameters with FSDP over the ranks expert parallelism leaves (``dp_shard / ep``) and divides their
reduced gradient by the whole data-parallel size, as the other parameters' are (torchtitan's layout).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from shardtrain.errors import ConfigError

#: What a layer must look like to be recognised (for error messages).
EXPERTS_CONTRACT = (
    "an experts module: an int num_experts, every parameter of its own shaped [num_experts, ...], and "
    "forward(hidden_states, top_k_index, top_k_weights) (transformers' MoE experts interface, as in Mixtral or "
    "examples/gpt/moe.py)"
)


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of the contract above."""
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return False
    own = [p for p in module._parameters.values() if p is not None]
    if not own or any(p.dim() < 2 or p.shape[0] != count for p in own):
        return False
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def find_experts(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every experts module inside ``module``, in definition order."""
    return [(name, m) for name, m in module.named_modules() if is_experts(m)]


def check_expert_parallel(module: nn.Module, expert_parallel_size: int) -> list[tuple[str, nn.Module]]:
    """The experts modules of ``module``, after checking that there is one and that ``expert_parallel_size``
    divides each one's experts; ``ConfigError`` naming the fix otherwise."""
    found = find_experts(module)
    if not found:
        raise ConfigError(
            f"expert_parallel_size={expert_parallel_size} but {type(module).__name__} has no mixture-of-experts layer "
            f"shardtrain recognises: expert parallelism needs {EXPERTS_CONTRACT}; leave expert_parallel_size at 1 "
            "for a dense model"
        )
    for name, experts in found:
        if experts.num_experts % expert_parallel_size:
            raise ConfigError(
                f"{name} has {experts.num_experts} experts, which expert_parallel_size={expert_parallel_size} does not "
                f"divide (each rank of an expert-parallel group holds the same number); choose an "
                f"expert_parallel_size that divides {experts.num_experts}"
            )
    return found


def apply_expert_parallel(module: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Divide the experts of every experts module in ``module`` over ``ep_mesh`` (``ExpertParallel``); returns
    those modules (the strategy makes each its own FSDP unit)."""
    found = check_expert_parallel(module, ep_mesh.size())
    for _, experts in found:
        ExpertParallel()._apply(experts, ep_mesh)
    return [experts for _, experts in found]


class ExpertParallel(ParallelStyle):
    """PyTorch's ``ParallelStyle`` for an experts module: parameters sharded along the experts over a 1-D mesh,
    tokens dispatched to their experts' ranks before the forward and combined after it (see the module's text).

    One object per module: it keeps the current forward's routing between the two halves."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._routing: _Routing | None = None
        return distribute_module(
            module,
            device_mesh,
            partition_fn=self._shard_experts,
            input_fn=self._dispatch,
            output_fn=self._combine,
        )

    @staticmethod
    def _shard_experts(name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if not is_experts(module):
            return  # submodules (an activation) have no expert parameters
        for param_name, param in list(module.named_parameters(recurse=False)):
            sharded = nn.Parameter(distribute_tensor(param, device_mesh, [Shard(0)]), requires_grad=param.requires_grad)
            module.register_parameter(param_name, sharded)

    def _dispatch(self, module: nn.Module, inputs: tuple[Any, ...], device_mesh: DeviceMesh) -> tuple[Any, ...]:
        hidden_states, top_k_index, top_k_weights = inputs[:3]
        routing = _Routing.route(top_k_index, top_k_weights, module.num_experts, device_mesh)
        received = all_to_all_single_autograd(
            hidden_states[routing.token], routing.received_splits, routing.sent_splits, routing.group
        )
        routing.swap_in_local_parameters(module)
        routing.hidden_like = hidden_states
        self._routing = routing
        ones = torch.ones(received.shape[0], 1, dtype=top_k_weights.dtype, device=received.device)
        return (received, routing.local_expert[:, None], ones, *inputs[3:])

    def _combine(self, module: nn.Module, outputs: torch.Tensor, device_mesh: DeviceMesh) -> torch.Tensor:
        routing, self._routing = self._routing, None
        assert routing is not None, "the experts' output without its dispatch"
        outputs = routing.restore_parameters(module, outputs)
        back = all_to_all_single_autograd(outputs, routing.sent_splits, routing.received_splits, routing.group)
        weighted = back * routing.weight[:, None].to(back.dtype)
        hidden_states = routing.hidden_like
        assert hidden_states is not None
        return torch.zeros_like(hidden_states).index_add(0, routing.token, weighted.to(hidden_states.dtype))


@dataclass
class _Routing:
    """One forward's routing on one rank: which token each sorted choice is (``token``), its router weight, how many
    rows go to and come from each rank of the group, and each received row's local expert; then, during the
    module's forward, the tokens it came from and the parameters swapped out."""

    group: Any
    token: torch.Tensor
    weight: torch.Tensor
    sent_splits: list[int]
    received_splits: list[int]
    local_expert: torch.Tensor
    local_experts: int
    hidden_like: torch.Tensor | None = None
    swapped: dict[str, DTensor] = field(default_factory=dict)
    num_experts: int = 0

    @classmethod
    def route(
        cls, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, mesh: DeviceMesh
    ) -> "_Routing":
        group, ranks = mesh.get_group(), mesh.size()
        local_experts = num_experts // ranks
        k = top_k_index.shape[1]
        choices = top_k_index.reshape(-1)
        order = choices.argsort(stable=True)  # by expert, so by destination rank too
        counts = torch.bincount(choices, minlength=num_experts)
        # Each rank learns how many rows of each of its experts every rank sends: [source rank, local expert].
        incoming = all_to_all_single(counts, None, None, group)
        sizes = torch.cat([counts.view(ranks, local_experts).sum(1), incoming.view(ranks, local_experts).sum(1)])
        values = sizes.tolist()  # the one host sync: the split sizes
        sent, received = values[:ranks], values[ranks:]
        experts = torch.arange(local_experts, device=counts.device).repeat(ranks)
        local_expert = torch.repeat_interleave(experts, incoming, output_size=sum(received))
        return cls(
            group=group,
            token=order // k,
            weight=top_k_weights.reshape(-1)[order],
            sent_splits=sent,
            received_splits=received,
            local_expert=local_expert,
            local_experts=local_experts,
        )

    def swap_in_local_parameters(self, module: nn.Module) -> None:
        """For the module's own forward: its parameters as this rank's experts (plain tensors, ``to_local()`` keeps
        the gradient's path to the DTensor) and ``num_experts`` as their count; undone by ``restore_parameters``."""
        self.swapped = {name: p for name, p in module._parameters.items() if isinstance(p, DTensor)}
        for name, param in self.swapped.items():
            module._parameters[name] = param.to_local()  # type: ignore[assignment]
        self.num_experts, module.num_experts = module.num_experts, self.local_experts

    def restore_parameters(self, module: nn.Module, outputs: torch.Tensor) -> torch.Tensor:
        """Put the module's DTensor parameters and ``num_experts`` back; returns ``outputs``. (A rank that received no
        row leaves its experts out of the graph; FSDP2 reduces their gradient as zeros, tested with transformers'
        eager experts loop.)"""
        for name, param in self.swapped.items():
            module._parameters[name] = param
        module.num_experts = self.num_experts
        return outputs
