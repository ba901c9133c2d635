"""DeepSpeed ZeRO state in shardtrain's common checkpoint format (whole tensors keyed by parameter name).

ZeRO keeps each rank's share of a parameter as a slice of a *flattened* buffer, which is not a
rectangular block of the parameter, so it cannot be written as a DCP shard of that parameter.
Instead every parameter (and its optimizer state) is assembled whole with DeepSpeed's own
``safe_get_full_*`` functions, one parameter at a time, and kept only by its *owner* rank
(parameter ``i`` belongs to rank ``i % world_size``). Each rank then writes what it owns, so a
save needs about 1/world_size of the fp32 model and optimizer state in host memory per rank,
and the files are ordinary DCP checkpoints that FSDP, DDP or one process load (and reshard).

Loading is the reverse: each rank reads the parameters it owns on the *current* world size,
and the owner broadcasts each one to the others, which keep their own ZeRO share.

Model weights are the fp32 master weights (what the optimizer updates), whatever the
precision of the forward pass.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn


def named_state_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every (name, parameter or persistent buffer) of ``module.state_dict()``, tied names included."""
    return [
        (name, tensor) for name, tensor in module.state_dict(keep_vars=True).items() if isinstance(tensor, torch.Tensor)
    ]


def full_shape(tensor: torch.Tensor) -> torch.Size:
    return tensor.ds_shape if hasattr(tensor, "ds_shape") else tensor.shape  # type: ignore[attr-defined]


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def keep_owned(names: list[str], values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` this rank owns (``names[i]`` belongs to rank ``i % world_size``)."""
    rank, world = _rank_and_world()
    return {name: values[name] for index, name in enumerate(names) if index % world == rank and name in values}


def full_fp32_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole fp32 value of a (possibly ZeRO-partitioned) parameter or buffer. Collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    if isinstance(tensor, nn.Parameter):
        value = safe_get_full_fp32_param(tensor)
        if value is not None:
            return value.reshape(full_shape(tensor)).float()
        if hasattr(tensor, "ds_id"):  # partitioned but not trained (no optimizer): gather it
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                return tensor.detach().clone().float()
    return tensor.detach().float()


def model_state(module: nn.Module, owned_only: bool) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors by name on CPU: this rank's owned ones, or all (``owned_only=False``)."""
    rank, world = _rank_and_world()
    out: dict[str, torch.Tensor] = {}
    for index, (name, tensor) in enumerate(named_state_tensors(module)):
        value = full_fp32_value(tensor)  # every rank takes part in the gather
        if not owned_only or index % world == rank:
            out[name] = value.to("cpu", copy=True).to(tensor.dtype if not tensor.is_floating_point() else torch.float32)
    return out


def load_model_state(
    module: nn.Module, loaded: dict[str, torch.Tensor], device: torch.device, zero_optimizer: Any
) -> None:
    """Put whole tensors (each rank holding the ones it owns) into the ZeRO partitions and the module."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, tensor, value in _broadcast_owned(named_state_tensors(module), loaded, device):
        with torch.no_grad():
            if isinstance(tensor, nn.Parameter) and hasattr(tensor, "ds_id") and zero_optimizer is not None:
                _set_zero3_partition(zero_optimizer, tensor, value)
            elif isinstance(tensor, nn.Parameter) and (hasattr(tensor, "ds_id") or hasattr(tensor, "_hp_mapping")):
                safe_set_full_fp32_param(tensor, value)
                if hasattr(tensor, "ds_id"):  # ZeRO-3 without an optimizer: write the partition directly
                    _write_partition(tensor, value)
            else:
                tensor.data.copy_(value.reshape(tensor.shape))
    refresh_low_precision_params(zero_optimizer, module)


def _gather_again(module: nn.Module) -> None:
    """ZeRO-3 parameters held whole between forwards (persistent ones: small parameters, below DeepSpeed's
    ``param_persistence_threshold``) were gathered before the load wrote their partitions, and a gather skips
    parameters already whole: release them and gather again, so the next forward sees the loaded values (with several
    processes; in one the partition is the whole tensor). Every rank holds the same ones: collective."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    whole = [p for p in module.parameters() if hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.AVAILABLE]
    if whole:
        whole[0].partition(whole)  # frees the stale whole copies; the partitions (just written) stay
        whole[0].all_gather(whole)


def _write_partition(param: torch.Tensor, value: torch.Tensor) -> None:
    rank, _ = _rank_and_world()
    partition = param.ds_tensor  # type: ignore[attr-defined]
    flat = value.reshape(-1).to(partition.dtype)
    start = partition.numel() * rank
    piece = flat[start : start + partition.numel()]
    partition.data[: piece.numel()].copy_(piece)


def _set_zero3_partition(zero_optimizer: Any, param: torch.Tensor, value: torch.Tensor, key: str | None = None) -> None:
    """This rank's part of ZeRO-3's fp32 master weights (``key=None``) or optimizer state ``key`` of
    ``param`` from its whole ``value``. DeepSpeed 0.19's ``set_full_hp_param`` cuts the whole value
    at ``rank * partition size`` with the padded size, which runs past the end on the last rank
    when the parameter's size is not a multiple of the world size; here the padding stays zero.
    Private DeepSpeed API (``_get_fp32_opt_state_partition``), as of 0.19."""
    if not param.requires_grad:
        return
    partition, group = zero_optimizer._get_fp32_opt_state_partition(
        param, release_swap_buffers=False, optim_state_key=key
    )
    start = partition.numel() * zero_optimizer._get_param_partition_rank(param)
    piece = value.reshape(-1).to(partition.dtype)[start : start + partition.numel()]
    partition.data.zero_()
    partition.data[: piece.numel()].copy_(piece)
    if zero_optimizer._swappable_optimizer_subgroup(group):
        zero_optimizer._optimizer_states_and_gradient_swap_out(group)


def refresh_low_precision_params(zero_optimizer: Any, module: nn.Module) -> None:
    """Copy the fp32 master partitions into the parameters the forward pass uses, ZeRO-3's whole ones included."""
    if hasattr(zero_optimizer, "update_lp_params"):  # ZeRO 1 and 2
        zero_optimizer.update_lp_params()
    elif hasattr(zero_optimizer, "_reassign_or_swap_out_partitioned_parameters"):  # ZeRO 3
        for sub_group in range(len(zero_optimizer.fp16_partitioned_groups_flat)):
            zero_optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)
    _gather_again(module)


def base_optimizer(zero_optimizer: Any) -> torch.optim.Optimizer | None:
    """The optimizer doing the update (torch's AdamW, DeepSpeed's CPU Adam) inside ZeRO's wrapper."""
    inner = getattr(zero_optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else zero_optimizer


def optimizer_tensor_keys(zero_optimizer: Any) -> list[str]:
    optimizer = base_optimizer(zero_optimizer)
    for state in optimizer.state.values():
        if state:
            return [
                key
                for key, value in state.items()
                if key != "step" and isinstance(value, torch.Tensor) and value.dim() > 0
            ]
    return []


def optimizer_step_count(zero_optimizer: Any) -> float:
    optimizer = base_optimizer(zero_optimizer)
    for state in optimizer.state.values():
        if "step" in state:
            step = state["step"]
            return float(step.item() if isinstance(step, torch.Tensor) else step)
    return 0.0


def optimizer_state(
    module: nn.Module,
    zero_optimizer: Any,
    user_optimizer: torch.optim.Optimizer,
    group_names: list[list[str]],
    owned_only: bool,
) -> dict[str, Any]:
    """The optimizer state in torch's ``get_optimizer_state_dict`` layout, whole tensors by parameter name."""
    from deepspeed.utils import safe_get_full_optimizer_state

    rank, world = _rank_and_world()
    keys = optimizer_tensor_keys(zero_optimizer)
    step = optimizer_step_count(zero_optimizer)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for index, (name, param) in enumerate(_trainable(module)):
        values = {key: safe_get_full_optimizer_state(param, key) for key in keys}
        if not owned_only or index % world == rank:
            entry = {
                key: value.reshape(full_shape(param)).to("cpu", torch.float32, copy=True)
                for key, value in values.items()
                if value is not None
            }
            if entry:
                state[name] = {"step": torch.tensor(step, dtype=torch.float32), **entry}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": list(names)}
        for group, names in zip(user_optimizer.param_groups, group_names)
    ]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(
    module: nn.Module,
    zero_optimizer: Any,
    user_optimizer: torch.optim.Optimizer,
    loaded: dict[str, Any],
    device: torch.device,
) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    keys = optimizer_tensor_keys(zero_optimizer)
    saved_state: dict[str, dict[str, torch.Tensor]] = loaded.get("state", {})
    step: float | None = None
    trainable = _trainable(module)
    saved_keys = {key for entry in saved_state.values() for key in entry if key != "step"}
    if saved_keys and not keys:
        warnings.warn(
            f"the checkpoint holds optimizer state ({', '.join(sorted(saved_keys))}) that this DeepSpeed "
            "optimizer cannot take (ZeRO-3 with the optimizer state on NVMe creates it only at its first "
            "step): it restarts from zero, so the resumed losses drift from the uninterrupted run; "
            "resume with offload_optimizer_device='cpu' to keep it",
            stacklevel=2,
        )
    for key in keys:
        owned = {name: entry[key] for name, entry in saved_state.items() if key in entry}
        for name, param, value in _broadcast_owned(trainable, owned, device, dtype=torch.float32):
            if hasattr(param, "ds_id"):
                _set_zero3_partition(zero_optimizer, param, value, key)
            else:
                safe_set_full_optimizer_state(param, value, key)
    steps = [entry["step"] for entry in saved_state.values() if "step" in entry]
    step_tensor = torch.tensor([float(steps[0]) if steps else -1.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(step_tensor, op=dist.ReduceOp.MAX)  # only owners hold entries
    if step_tensor.item() >= 0:
        step = float(step_tensor.item())
        _set_step(base_optimizer(zero_optimizer), step)
    for group, saved in zip(user_optimizer.param_groups, loaded.get("param_groups", [])):
        for key, value in saved.items():
            if key != "params":
                group[key] = value


def _set_step(optimizer: torch.optim.Optimizer, step: float) -> None:
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = int(step)


def initialise_optimizer_state(zero_optimizer: Any) -> None:
    """Create the optimizer's state (zeros, step 0) now instead of at its first step.

    torch's and DeepSpeed's Adam create their state lazily; a checkpoint can only be loaded into
    state that exists. One step with zero gradients and a learning rate of 0 creates it without
    changing a weight; the step counters are then reset to 0.
    """
    optimizer = base_optimizer(zero_optimizer)
    if optimizer is None or any(optimizer.state.values()) or getattr(zero_optimizer, "swap_optimizer", False):
        return  # already there (ZeRO-3 may hold empty entries before the first step), or swapped to disk
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:  # ZeRO-3 puts each sub-group into its parameter group only while it steps
        work = [
            (optimizer.param_groups[zero_optimizer.sub_group_to_group_id[i]], [flat]) for i, flat in enumerate(flats)
        ]
    else:
        work = [(group, list(group["params"])) for group in optimizer.param_groups]
    for group, params in work:
        saved_params, saved_lr = group["params"], group["lr"]
        group["params"], group["lr"] = params, 0.0
        made = [p for p in params if p.grad is None]
        for param in made:
            param.grad = torch.zeros_like(param)
        optimizer.step()
        for param in made:
            param.grad = None
        group["params"], group["lr"] = saved_params, saved_lr
    _set_step(optimizer, 0)
    if hasattr(
        zero_optimizer, "_lazy_init_hp_params_optimizer_state"
    ):  # ZeRO 1/2 link state to parameters at their first step
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _trainable(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out = []
    for name, param in module.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out.append((name, param))
    return out


def _broadcast_owned(
    named: list[tuple[str, torch.Tensor]],
    owned: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (name, tensor, whole value) for each entry, sent by the rank that read it."""
    rank, world = _rank_and_world()
    distributed = world > 1
    present = torch.tensor(
        [float(index % world == rank and name in owned) for index, (name, _) in enumerate(named)], device=device
    )
    if distributed and len(named):
        dist.all_reduce(present, op=dist.ReduceOp.MAX)  # one collective says which entries the checkpoint has
    flags = present.tolist()
    for index, (name, tensor) in enumerate(named):
        if not flags[index]:
            continue  # not in the checkpoint (e.g. a parameter without optimizer state)
        owner = index % world
        value_dtype = dtype or (torch.float32 if tensor.is_floating_point() else tensor.dtype)
        value = (
            owned[name].to(device, value_dtype)
            if owner == rank
            else torch.empty(full_shape(tensor), dtype=value_dtype, device=device)
        )
        if distributed:
            dist.broadcast(value, src=owner)
        yield name, tensor, value
