"""What the Trainer adds to each step, over a bare loop on the Engine.

The same tiny model (a linear layer, batches of 8 x 16) trains for ``--steps`` steps on one process through a
plain loop on the Engine (forward, backward, clipping, step, zero_grad: what the Trainer does for it) and through
the Trainer, twice: with its extras off (logger, progress bar, checkpointing, model summary) and with its defaults
(CSV logging every 50 steps, the progress bar off as under a scheduler, the end-of-fit checkpoint). The model is
so small that a step's time is the loop's own work, so the difference per step is the Trainer's bookkeeping
(hooks, logging, the step counters, the heartbeat's assignments). Sides alternate over ``--rounds``; each
figure is the median step time of a round's timed steps (after ``--warmup``).

    python benchmarks/trainer_overhead.py --steps 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Callback, Engine, TrainModule, Trainer

HERE = Path(__file__).resolve().parent


class Tiny(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data(steps: int) -> DataLoader:
    x = torch.randn(8 * steps, 16, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


class Times(Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())


def engine_loop(steps: int) -> list[float]:
    engine = Engine(accelerator="cpu", devices=1, strategy="single")
    engine.launch()
    torch.manual_seed(0)
    module = Tiny()
    model, optimizer = engine.setup(module, torch.optim.SGD(module.parameters(), lr=0.01))
    ends = []
    for batch_idx, batch in enumerate(engine.setup_dataloaders(data(steps))):
        loss = model.training_step(batch, batch_idx)
        engine.backward(loss, model)
        engine.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        ends.append(time.perf_counter())
    return ends


def trainer_loop(steps: int, extras: bool, root: Path) -> list[float]:
    times = Times()
    options = dict(logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy="single",
        max_steps=steps,
        gradient_clip_val=1.0,
        enable_progress_bar=False,
        default_root_dir=root,
        log_every_n_steps=50,
        callbacks=[times],
        **({} if extras else options),
    )
    torch.manual_seed(0)
    trainer.fit(Tiny(), data(steps))
    return times.ends


def step_time(ends: list[float], warmup: int) -> float:
    return statistics.median(b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "trainer_overhead"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sides = ["engine", "trainer", "trainer_defaults"]
    rounds: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            for side in sides if index % 2 == 0 else sides[::-1]:
                if side == "engine":
                    ends = engine_loop(args.steps)
                else:
                    ends = trainer_loop(args.steps, side == "trainer_defaults", Path(tmp) / f"{side}{index}")
                rounds[side].append(step_time(ends, args.warmup))
    medians = {side: statistics.median(values) for side, values in rounds.items()}
    print(f"median step time over {args.rounds} rounds of {args.steps} steps (1 process, CPU, a linear layer):")
    for side in sides:
        extra = medians[side] - medians["engine"]
        print(f"  {side:17s} {medians[side] * 1e6:8.1f} us   over the Engine loop: {extra * 1e6:+7.1f} us")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "warmup": args.warmup, "rounds": rounds, "medians": medians}
    (out / "trainer_overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
