"""The memory formula of ``DeepSpeedStrategy``: where DeepSpeed ZeRO keeps the bytes, read from its built config.

It follows what DeepSpeed 0.19 allocates (ZeRO-1, 2 and 3 without offload are checked against a
real 2-rank run's tensors in ``tests/distributed/test_estimate_vs_measured.py``; docs/memory.md
has the table). The module's
weights are 16-bit under bf16/fp16 precision (else as estimated); the optimizer updates an fp32
master copy of this rank's partition (counted under optimizer) and keeps its state in fp32;
gradients are reduced through one whole reduce bucket on the device.

Only the layouts the registered ``deepspeed_stage_*`` names select have a formula: ZeRO-1,
ZeRO-2 with or without optimizer offload to CPU, and ZeRO-3 without offload, with parameters and
optimizer offloaded to CPU, or both to NVMe. Any other (stage 0, ZeRO-1 with offload, ZeRO-3
offloading only one of the two or to different devices) gets ``None``: no row, rather than a guess.
"""

from __future__ import annotations

from typing import Any

from shardtrain.memory import ModelFootprint, StrategyMemory

#: DeepSpeed's defaults (shardtrain passes them through unless the options or config set others):
#: the gradient reduce bucket (``reduce_bucket_size``, elements), allocated whole on the device, and
#: the pinned buffers of parameter swapping to NVMe (``offload_param.buffer_count × buffer_size``).
DEEPSPEED_REDUCE_BUCKET = 500_000_000
DEEPSPEED_NVME_SWAP_BUFFERS = 5 * 100_000_000
#: Precisions under which DeepSpeed keeps the module's weights in 16 bits (fp32 master copy aside).
_DEEPSPEED_16_BIT = ("bf16-mixed", "bf16-true", "16-mixed")


def deepspeed_memory(
    footprint: ModelFootprint, config: dict[str, Any], *, name: str = "deepspeed"
) -> StrategyMemory | None:
    """Per-device bytes under the ZeRO stage and offload devices of ``config`` (a built DeepSpeed config)."""
    zero = config.get("zero_optimization", {})
    layout = (zero.get("stage", 0), _device(zero, "offload_optimizer"), _device(zero, "offload_param"))
    bucket_elements = zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)
    if not isinstance(bucket_elements, (int, float)) or isinstance(bucket_elements, bool):
        bucket_elements = DEEPSPEED_REDUCE_BUCKET  # e.g. "auto": DeepSpeed's default
    world = footprint.world_size
    bytes_per_parameter = footprint.parameter_bytes / max(footprint.parameters, 1)
    element = 2 if footprint.precision in _DEEPSPEED_16_BIT else bytes_per_parameter
    P = int(footprint.parameters * element)  # the module's weights as DeepSpeed holds them
    # the trained weights' own element size: frozen ones may be kept in another dtype (frozen_dtype)
    trained_element = footprint.gradient_bytes / footprint.trainable_parameters if footprint.trainable_parameters else 4
    G = int(footprint.trainable_parameters * (2 if footprint.precision in _DEEPSPEED_16_BIT else trained_element))
    master = 4 * footprint.trainable_parameters  # fp32 copy of the weights the optimizer updates
    state = int(footprint.optimizer_bytes * 4 / trained_element)  # optimizer state in fp32
    gathered = int(2 * footprint.largest_unit_bytes * element / bytes_per_parameter)  # ZeRO-3: running + prefetched
    bucket = int(bucket_elements * element)
    optimizer = (master + state) // world
    host_offload = (master + state + master) // world + P // world  # master, state, fp32 gradients, 16-bit staging

    def row(parameters: int, gradients: int, optimizer: int, working: int, host: int = 0) -> StrategyMemory:
        return StrategyMemory(
            strategy=name,
            parameters=parameters,
            gradients=gradients,
            optimizer=optimizer,
            activations=footprint.activation_bytes,
            working=working,
            host_per_device=host,
        )

    if layout == (1, "none", "none"):  # full gradients exist until the end of backward, then this rank's partition
        return row(P, G, optimizer, bucket)
    if layout == (2, "none", "none"):
        return row(P, G // world, optimizer, bucket)
    if layout == (2, "cpu", "none"):
        return row(P, 0, 0, bucket, host_offload)
    if layout == (3, "none", "none"):
        return row(P // world, G // world, optimizer, gathered + bucket)
    if layout == (3, "cpu", "cpu"):
        return row(0, 0, 0, gathered + bucket, host_offload)
    if layout == (3, "nvme", "nvme"):  # pinned swap buffers in host memory; the rest on disk
        return row(0, 0, 0, gathered + bucket, int(DEEPSPEED_NVME_SWAP_BUFFERS * element))
    return None


def _device(zero: dict[str, Any], key: str) -> str:
    section = zero.get(key)
    return section.get("device", "none") if isinstance(section, dict) else "none"
