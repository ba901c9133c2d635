"""SampleText: at the end of training, a few hundred bytes written by the model, to see what it learned.

Listed in ``gpt.yaml`` under ``trainer.callbacks``. Every rank runs the same forwards (under
FSDP each forward gathers the shards); rank 0 prints.
"""

from __future__ import annotations

import textwrap

from shardtrain import Callback, Trainer, TrainModule


class SampleText(Callback):
    """Print ``length`` bytes generated from ``prompt`` when ``fit`` ends (``module.generate``).

    Args:
        prompt: the text the model continues.
        length: bytes to generate (one forward pass each).
        temperature: sampling temperature; 0 picks the most likely byte.
        seed: seed of the sampling generator (the same on every rank).
    """

    def __init__(
        self,
        prompt: str = "It is a truth universally acknowledged",
        length: int = 200,
        temperature: float = 0.8,
        seed: int = 0,
    ) -> None:
        self.prompt = prompt
        self.length = length
        self.temperature = temperature
        self.seed = seed

    def on_fit_end(self, trainer: Trainer, module: TrainModule) -> None:
        text = module.generate(self.prompt.encode(), self.length, temperature=self.temperature, seed=self.seed)
        if trainer.is_global_zero:
            decoded = text.decode("utf-8", errors="replace")  # an untrained model writes any byte: show controls as "?"
            sample = self.prompt + "".join(c if c.isprintable() or c == "\n" else "?" for c in decoded)
            print(
                f"sample after {trainer.global_step} steps:\n{textwrap.indent(sample, '  | ', lambda line: True)}",
                flush=True,
            )
