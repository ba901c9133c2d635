"""What the Trainer is doing now, in Lightning's words: ``trainer.state.fn``/``stage`` and the stage flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainerState:
    """``fn``: the entry point running (``"fit"``, ``"validate"``, None between them); ``stage``: the loop
    running (``"train"``, ``"sanity_check"``, ``"validate"``, None). Plain strings, equal to Lightning's
    ``TrainerFn``/``RunningStage`` values (which are ``str`` enums), so ``trainer.state.stage == "train"`` ports."""

    fn: str | None = None
    stage: str | None = None


class StageFlags:
    """``trainer.training``/``validating``/``sanity_checking``/``testing``/``predicting``: read from
    ``trainer.state.stage``; setting one to True sets the stage (as in Lightning)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __get__(self, trainer: object, owner: type | None = None) -> bool:
        if trainer is None:
            return self  # type: ignore[return-value]
        return trainer.state.stage == self.stage  # type: ignore[attr-defined]

    def __set__(self, trainer: object, value: bool) -> None:
        state = trainer.state  # type: ignore[attr-defined]
        if value:
            state.stage = self.stage
        elif state.stage == self.stage:
            state.stage = None
