"""What to do when a training step's loss or gradient norm is NaN or infinite.

``"ignore"`` (default) checks nothing and costs nothing. ``"stop"`` and ``"skip"`` look at every
optimizer step: each rank's loss and the norm of the whole gradient are gathered in one small
``all_gather`` and read on the host, so every rank takes the same decision (the cost is one
collective and one host sync per step, which is why it is opt-in). ``"stop"`` raises
:class:`~shardtrain.errors.NonFiniteError` on every rank, naming the step and the ranks;
``"skip"`` leaves out that optimizer step (and the LR schedulers' step) and trains on.

The gradient norm is checked where the loop can read it before the step: not under 16-mixed,
whose GradScaler already skips steps with inf/NaN gradients, and not under DeepSpeed, whose
optimizer step computes it; there only the loss is checked.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from shardtrain.errors import ConfigError, NonFiniteError

if TYPE_CHECKING:
    from shardtrain.engine.engine import Engine

CHOICES = ("ignore", "stop", "skip")


def check_choice(on_nonfinite: str) -> None:
    if on_nonfinite not in CHOICES:
        raise ConfigError(f"on_nonfinite must be one of {', '.join(map(repr, CHOICES))}, got {on_nonfinite!r}")


class NonFiniteCheck:
    """Decides, identically on every rank, whether a step is finite; counts the steps skipped."""

    def __init__(self, mode: str) -> None:
        check_choice(mode)
        self.mode = mode
        self.skipped_steps = 0

    def refuse_what_cannot_be_done(self, can_skip_optimizer_step: bool, loss_scaling: bool) -> None:
        """``"skip"`` needs a step the loop can leave out; raised at the start of fit, before training."""
        if self.mode != "skip":
            return
        if loss_scaling:
            raise ConfigError(
                "on_nonfinite='skip' with precision='16-mixed': its GradScaler already skips steps with inf/NaN gradients; use 'stop' or 'ignore'"
            )
        if not can_skip_optimizer_step:
            raise ConfigError(
                "on_nonfinite='skip' is not possible under DeepSpeed, whose engine owns the optimizer step; use 'stop' (checks the loss) or 'ignore'"
            )

    def step_is_finite(self, engine: "Engine", step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """True when every rank's loss and the gradient norm are finite; otherwise stop (raise) or report a skip."""
        norm = grad_norm.detach().float() if grad_norm is not None else torch.zeros((), device=loss.device)
        values = engine.all_gather(torch.stack([loss.detach().float(), norm.to(loss.device)])).tolist()
        bad_loss = {rank: row[0] for rank, row in enumerate(values) if not math.isfinite(row[0])}
        bad_norm = grad_norm is not None and not math.isfinite(values[0][1])
        if not bad_loss and not bad_norm:
            return True
        parts = []
        if bad_loss:
            parts.append("the loss is " + ", ".join(f"{value} on rank {rank}" for rank, value in bad_loss.items()))
        if bad_norm:
            parts.append(f"the gradient norm is {values[0][1]}")
        what = f"step {step}: {' and '.join(parts)}"
        if self.mode == "stop":
            raise NonFiniteError(
                f"{what}. Lower the learning rate, clip gradients (gradient_clip_val), prefer bf16 to 16-mixed, look for a bad batch, "
                "or pass on_nonfinite='skip' to leave such steps out"
            )
        self.skipped_steps += 1
        if engine.is_global_zero:
            print(f"[shardtrain] {what}; the optimizer step was skipped ({self.skipped_steps} so far)", flush=True)
        return False
