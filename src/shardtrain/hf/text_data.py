"""A data module for causal language modelling on local text, tokenised with a model's own tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from shardtrain.datamodule import DataModule
from shardtrain.errors import ConfigError
from shardtrain.hf.pretrained import require_transformers, resolve_model_directory


class TokenBlocks(Dataset):
    """Fixed-length blocks of one token stream, as ``{"input_ids", "labels"}`` (transformers shifts the labels)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.tokens[index * self.seq_len : (index + 1) * self.seq_len]
        return {"input_ids": block, "labels": block}


class TextData(DataModule):
    """Text files (``.txt``: one document per file; ``.jsonl``: one JSON object per line, its
    ``text_field``) tokenised with the tokenizer saved in ``tokenizer`` (a model directory), joined
    with the end-of-text token and cut into blocks of ``seq_len`` tokens. The last
    ``val_fraction`` of the blocks is the validation set. ``batch_size`` is per process.
    Every rank tokenises the files itself: meant for fine-tuning sets of up to some hundred MB.
    """

    def __init__(
        self,
        files: list[str] | str,
        tokenizer: str,
        seq_len: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        text_field: str = "text",
        num_workers: int = 0,
    ) -> None:
        self.files = [files] if isinstance(files, str) else list(files)
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.val_fraction, self.text_field, self.num_workers = val_fraction, text_field, num_workers
        self._splits: tuple[TokenBlocks, TokenBlocks] | None = None

    def documents(self) -> list[str]:
        found: list[str] = []
        for name in self.files:
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"TextData: {name} is not a file")
            if path.suffix == ".jsonl":
                lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                found += [json.loads(line)[self.text_field] for line in lines]
            else:
                found.append(path.read_text(encoding="utf-8"))
        return found

    def splits(self) -> tuple[TokenBlocks, TokenBlocks]:
        if self._splits is None:
            transformers = require_transformers()
            tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_directory(self.tokenizer))
            separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids: list[int] = []
            for document in self.documents():
                ids += tokenizer(document, add_special_tokens=False)["input_ids"] + separator
            tokens = torch.tensor(ids, dtype=torch.long)
            blocks = len(tokens) // self.seq_len
            val_blocks = int(blocks * self.val_fraction)
            if blocks - val_blocks < 1:
                raise ConfigError(f"TextData: {len(tokens)} tokens make no training block of seq_len={self.seq_len}")
            cut = (blocks - val_blocks) * self.seq_len
            self._splits = (TokenBlocks(tokens[:cut], self.seq_len), TokenBlocks(tokens[cut:], self.seq_len))
        return self._splits

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits()[0], shuffle=True)

    def val_dataloader(self) -> DataLoader | None:
        validation = self.splits()[1]
        return self._loader(validation, shuffle=False) if len(validation) else None

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers, drop_last=True
        )
