"""Start-up time of a run resumed late in a long epoch: from ``fit`` to the first trained step.

    python benchmarks/resume_startup.py                          # the current code only
    python benchmarks/resume_startup.py --before /tmp/before/src # and an older checkout, same procedure

Data: a 64 MB text file on disk; each sample reads a 4 KB window at its own offset (seek and
read), decodes it and tokenises it into 256 word ids (a dict look-up per word), as a text
corpus does. One epoch is ``--batches`` batches of ``--batch-size`` shuffled samples.

Each figure comes from a fresh process running the same steps: train 2 steps and save a
checkpoint whose loop position is moved to batch ``--resume-at`` of epoch 0 (what training that
many steps leaves; the weights do not change how long start-up takes), then resume from it with
a new Trainer and time ``fit`` until the first trained step ends. It prints the seconds, the
samples loaded before that step, and the cost of one sample.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WINDOW, TOKENS = 4096, 256


def make_corpus(path: Path, megabytes: int) -> None:
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    with open(path, "w") as handle:
        written = 0
        while written < megabytes * 2**20:
            line = " ".join(rng.choice(words) for _ in range(200)) + "\n"
            handle.write(line)
            written += len(line)


def measure(corpus: Path, batches: int, batch_size: int, resume_at: int, work: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from shardtrain import Callback, TrainModule, Trainer

    class TextWindows(Dataset):
        """Sample i: the 4 KB of the corpus at a fixed pseudo-random offset, decoded and tokenised."""

        def __init__(self, path: Path, size: int) -> None:
            self.path, self.size, self.loaded = path, size, 0
            self.span = path.stat().st_size - WINDOW
            self.vocabulary: dict[str, int] = {}
            self.handle = None

        def __len__(self) -> int:
            return self.size

        def __getitem__(self, index: int):
            self.loaded += 1
            if self.handle is None:
                self.handle = open(self.path, "rb")
            self.handle.seek((index * 2654435761) % self.span)
            words = self.handle.read(WINDOW).decode("utf-8", errors="replace").split()[1 : TOKENS + 2]
            ids = [self.vocabulary.setdefault(word, len(self.vocabulary)) % 8192 for word in words]
            return torch.tensor(ids[:TOKENS] + [0] * (TOKENS - len(ids[:TOKENS])))

    class Bag(TrainModule):
        def configure_model(self) -> None:
            self.embedding = torch.nn.EmbeddingBag(8192, 32)
            self.head = torch.nn.Linear(32, 1)

        def training_step(self, batch, batch_idx):
            return self.head(self.embedding(batch)).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class FirstStep(Callback):
        def __init__(self) -> None:
            self.at: float | None = None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if self.at is None:
                self.at = time.perf_counter()

    def trainer(max_steps: int, callbacks=()) -> Trainer:
        return Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            default_root_dir=work,
            logger=False,
            enable_progress_bar=False,
            seed=0,
            callbacks=list(callbacks),
        )

    def loader(dataset: TextWindows) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True)

    samples = batches * batch_size
    first = trainer(2)
    first.fit(Bag(), loader(TextWindows(corpus, samples)))
    first.global_step = first.batches_seen_in_epoch = resume_at  # the loop position after resume_at steps
    first.save_checkpoint()

    dataset = TextWindows(corpus, samples)
    started = time.perf_counter()
    for index in range(2000):
        dataset[index]
    per_sample = (time.perf_counter() - started) / 2000

    dataset = TextWindows(corpus, samples)
    first_step = FirstStep()
    resumed = trainer(resume_at + 1, [first_step])
    started = time.perf_counter()
    resumed.fit(Bag(), loader(dataset), ckpt_path="last")
    return {
        "seconds_to_first_step": first_step.at - started,
        "samples_loaded": dataset.loaded,
        "sample_cost_us": per_sample * 1e6,
        "global_step": resumed.global_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=25_000, help="batches in one epoch")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resume-at", type=int, default=24_000, help="the checkpoint's batch in the epoch")
    parser.add_argument("--corpus-mb", type=int, default=64)
    parser.add_argument("--before", default=None, help="the src/ directory of an older checkout to measure too")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, in this fresh process
        corpus, work = args.child.split(os.pathsep)
        result = measure(Path(corpus), args.batches, args.batch_size, args.resume_at, Path(work))
        print("RESULT " + json.dumps(result), flush=True)
        return

    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        make_corpus(corpus, args.corpus_mb)
        sides = ([("before", args.before)] if args.before else []) + [("current", None)]
        results = {}
        for name, source in sides:
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            if source:
                env["PYTHONPATH"] = os.pathsep.join([str(Path(source).resolve()), env.get("PYTHONPATH", "")])
            work = Path(scratch) / name
            command = [sys.executable, __file__, "--child", f"{corpus}{os.pathsep}{work}"]
            command += ["--batches", str(args.batches), "--batch-size", str(args.batch_size)]
            command += ["--resume-at", str(args.resume_at)]
            completed = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                sys.exit(f"{name} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
            results[name] = json.loads(lines[-1].removeprefix("RESULT "))
    print(
        f"resume at batch {args.resume_at} of a {args.batches}-batch epoch, batch size {args.batch_size}, "
        f"shuffled, one process"
    )
    for name, result in results.items():
        print(
            f"  {name:8s} {result['seconds_to_first_step']:8.2f} s from fit() to the first trained step, "
            f"{result['samples_loaded']:6d} samples loaded ({result['sample_cost_us']:.0f} us each)"
        )


if __name__ == "__main__":
    main()
