"""The embedded corpus as next-byte prediction samples.

Tokens are raw bytes (vocabulary 256): no tokenizer to download, and every text works.
Each sample is a window of ``seq_len + 1`` bytes: inputs are the first ``seq_len``, targets the
last ``seq_len``. Windows do not overlap; the last 10% of the text is held out for validation.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from shardtrain import DataModule

CORPUS = Path(__file__).parent / "data" / "corpus.txt.gz"


def load_corpus(path: Path = CORPUS) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return handle.read()


class ByteWindows(Dataset):
    """Non-overlapping windows of a byte string, as (inputs, targets) int64 tensors."""

    def __init__(self, data: bytes, seq_len: int) -> None:
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.seq_len = seq_len
        self.count = (len(self.tokens) - 1) // seq_len
        if self.count < 1:
            raise ValueError(f"text of {len(data)} bytes is too short for seq_len={seq_len}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1].long()
        return window[:-1], window[1:]


def corpus_splits(seq_len: int, val_fraction: float = 0.1, path: Path = CORPUS) -> tuple[ByteWindows, ByteWindows]:
    data = load_corpus(path)
    cut = int(len(data) * (1 - val_fraction))
    return ByteWindows(data[:cut], seq_len), ByteWindows(data[cut:], seq_len)


def corpus_loaders(seq_len: int, batch_size: int, shuffle: bool = True) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders; ``batch_size`` is per process."""
    train, val = corpus_splits(seq_len)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=shuffle, drop_last=True),
        DataLoader(val, batch_size=batch_size, shuffle=False, drop_last=True),
    )


class CorpusData(DataModule):
    """The embedded corpus as a DataModule, for run configs (``data.class_path``).

    Args:
        seq_len: bytes per sample (must match the model's ``seq_len``).
        batch_size: sequences per process per step.
        shuffle: shuffle the training windows each epoch.
        limit_samples: use only the first this many training windows (for small tests).
    """

    def __init__(
        self, seq_len: int = 256, batch_size: int = 8, shuffle: bool = True, limit_samples: int | None = None
    ) -> None:
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.limit_samples = limit_samples
        self._splits: tuple[Dataset, Dataset] | None = None

    def _datasets(self) -> tuple[Dataset, Dataset]:
        if self._splits is None:
            train, val = corpus_splits(self.seq_len)
            self._splits = (Subset(train, range(self.limit_samples)) if self.limit_samples else train, val)
        return self._splits

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._datasets()[0], batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._datasets()[1], batch_size=self.batch_size, shuffle=False, drop_last=True)
