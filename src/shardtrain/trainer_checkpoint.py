"""The Trainer's side of checkpoints: what a training state is, and how a run resumes from one.

A checkpoint holds the module, optimizers, LR schedulers, loss scaler, callbacks' state, every
rank's RNG state and the loop position (global step, epoch, batches seen in the epoch), so that
a resumed run continues at the next batch it would have trained on. Storage goes through
``Engine.save``/``Engine.load``: a sharded DCP directory, committed atomically.

Where the data continues: ``batches_seen_in_epoch`` is enough for map-style datasets (the
sampler's order is seeded per epoch, and the batches before it are skipped by index, see
``shardtrain.data``). A train loader with its own ``state_dict`` (torchdata's
``StatefulDataLoader``, e.g. over an ``IterableDataset``) is saved too, one state per rank as
JSON in ``meta.json``, and it continues from there on the same number of ranks.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from shardtrain.checkpoint import read_meta
from shardtrain.checkpoint.consolidate import is_weights_file, load_weights
from shardtrain.errors import CheckpointError

if TYPE_CHECKING:
    from shardtrain.trainer import Trainer

LAST = "last"


class TrainerCheckpointing:
    """Mixed into :class:`~shardtrain.trainer.Trainer`."""

    @property
    def checkpoint_dir(self: "Trainer") -> Path:
        return self.default_root_dir / "checkpoints"

    def save_checkpoint(self: "Trainer", path: str | os.PathLike | None = None, *, asynchronous: bool = False) -> Path:
        """Save the training state as a sharded checkpoint directory (every rank must call this).

        Each rank writes its own shards; the directory appears atomically once all have
        finished, and ``<default_root_dir>/checkpoints/last`` then names it. Returns the path;
        the default is ``<default_root_dir>/checkpoints/step=<N>``. With ``asynchronous=True``
        the loop is blocked only while the state is copied to CPU memory; the files are written
        and committed in the background (the next save and the end of ``fit`` wait for it).
        """
        if self.model is None:
            raise RuntimeError("save_checkpoint() needs a module that has been set up by fit()")
        target = Path(path) if path is not None else self.checkpoint_dir / f"step={self.global_step}"
        state = self._checkpoint_state()
        self._call("on_save_checkpoint", state)
        checkpoint_dir = self.checkpoint_dir
        self.engine.save(
            target,
            state,
            asynchronous=asynchronous,
            on_commit=lambda committed: _point_last_at(checkpoint_dir, committed),
        )
        self._last_checkpoint = (self.global_step, target)
        return target

    def _checkpoint_state(self: "Trainer") -> dict[str, Any]:
        state: dict[str, Any] = {
            "module": self.model,
            "optimizers": list(self.optimizers),
            "lr_schedulers": [config.scheduler for config in self.lr_schedulers],
            "loop": {
                "global_step": self.global_step,
                "current_epoch": self.current_epoch,
                "batches_seen_in_epoch": self.batches_seen_in_epoch,
            },
            "callbacks": {callback.state_key: callback.state_dict() for callback in self.callbacks},
            "trainer_config": {**self.config, "strategy": repr(self.strategy), "world_size": self.world_size},
        }
        scaler = self.engine.precision.grad_scaler(self.engine.device.type)
        if scaler is not None:
            state["grad_scaler"] = scaler
        loader = getattr(self, "_train_loader", None)
        if loader is not None and loader.position() is not None:
            state["train_dataloader"] = _LoaderPosition(loader, self.global_rank, self.world_size)
        return state

    def _resolve_checkpoint(self: "Trainer", ckpt_path: str | os.PathLike) -> Path | None:
        """The checkpoint directory ``ckpt_path`` names; None for ``"last"`` before any save."""
        path = Path(ckpt_path)
        if path.name == LAST and path.is_file():  # the pointer file itself
            return path.parent / path.read_text().strip()
        if str(ckpt_path) != LAST:
            return path
        pointer = self.checkpoint_dir / LAST
        if not pointer.is_file():
            # The same command starts a job and its restarts (torchrun --max-restarts, a requeued
            # SLURM job): the first attempt has nothing to resume from. Lightning does the same.
            if self.is_global_zero:
                print(
                    f"[shardtrain] ckpt_path='last' but no checkpoint was saved in {self.checkpoint_dir} yet; training starts from the beginning",
                    flush=True,
                )
            return None
        return self.checkpoint_dir / pointer.read_text().strip()

    def _restore(self: "Trainer", ckpt_path: str | os.PathLike) -> None:
        path = self._resolve_checkpoint(ckpt_path)
        if path is None:
            return
        if is_weights_file(path):  # consolidated weights: initialise the model from them, start at step 0
            self.strategy.load_module_state_dict(self.module, load_weights(path), strict=True, full=True)
            return
        state = self._checkpoint_state()
        saved = read_meta(path)["state"]
        if "grad_scaler" in state and "grad_scaler" not in saved:
            del state["grad_scaler"]  # saved without loss scaling (another precision): the scaler starts fresh
        if "train_dataloader" in state and "train_dataloader" not in saved:
            del state["train_dataloader"]  # saved with a plain loader: the data loader reads up to the position
        self.engine.load(path, state)
        for callback in self.callbacks:
            if callback.state_key in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][callback.state_key])
        self.resumed_config = state["trainer_config"]  # what the checkpoint was trained with
        loop = state["loop"]
        self.global_step = loop["global_step"]
        self.current_epoch = loop["current_epoch"]
        self.batches_seen_in_epoch = loop["batches_seen_in_epoch"]
        for logger in self._rank_zero_loggers():
            if callable(getattr(logger, "log_resume", None)):  # CSVLogger: continue metrics.csv after a marker row
                logger.log_resume(self.global_step)
        self._call("on_load_checkpoint", state)


def _point_last_at(directory: Path, target: Path) -> None:
    """Atomically make ``<directory>/last`` name ``target`` (relative when inside the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = os.path.relpath(target.resolve(), directory.resolve())
    temporary = directory / f".{LAST}.tmp"
    temporary.write_text(name)
    os.replace(temporary, directory / LAST)


class _LoaderPosition:
    """Every rank's ``StatefulDataLoader.state_dict()`` as JSON, gathered on save (every rank saves)."""

    def __init__(self, loader: Any, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def state_dict(self) -> dict[str, Any]:
        local = _to_json(self.loader.position())
        ranks = [local]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, local)
        return {"world_size": self.world_size, "ranks": ranks}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved["world_size"] != self.world_size:
            raise CheckpointError(
                f"the train DataLoader's position was saved by {saved['world_size']} processes and this run has "
                f"{self.world_size}; a StatefulDataLoader resumes only on as many processes as saved it"
            )
        self.loader.restore_position(_from_json(saved["ranks"][self.rank]))


def _to_json(value: Any) -> Any:
    """``value`` with tensors, bytes and non-string keys spelled in JSON (``_from_json`` reads it back)."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        return {"__tensor__": base64.b64encode(raw).decode(), "dtype": str(data.dtype), "shape": list(data.shape)}
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _to_json(item) for key, item in value.items()}
        return {"__items__": [[_to_json(key), _to_json(item)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"the train DataLoader's state holds a {type(value).__name__}, which cannot be saved as JSON")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        dtype = getattr(torch, value["dtype"].removeprefix("torch."))
        raw = bytearray(base64.b64decode(value["__tensor__"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(value["shape"]).clone()
    if "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if "__items__" in value:
        return {_from_json(key): _from_json(item) for key, item in value["__items__"]}
    return {key: _from_json(item) for key, item in value.items()}
