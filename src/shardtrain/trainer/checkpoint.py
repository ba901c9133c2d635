"""The Trainer's checkpoints: where they go, what ``last`` names, and saving and restoring a training state.

A checkpoint holds the module, optimizers, LR schedulers, loss scaler, callbacks' and DataModule's state, every
rank's RNG state and the loop position (global step, epoch, batches seen in the epoch), so that
a resumed run continues at the next batch it would have trained on. The Trainer says what the
state is; this collaborator stores it through ``Engine.save``/``Engine.load`` (a sharded DCP
directory, committed atomically) and keeps ``<default_root_dir>/checkpoints/last`` pointing at
the newest one.

Where the data continues: ``batches_seen_in_epoch`` is enough for map-style datasets (the
sampler's order is seeded per epoch, and the batches before it are skipped by index, see
``shardtrain.data``). A train loader with its own ``state_dict`` (torchdata's
``StatefulDataLoader``) is saved too (``checkpoint.loader_position``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardtrain.checkpoint import read_meta, verify_checkpoint
from shardtrain.checkpoint.consolidate import is_weights_file, load_weights
from shardtrain.checkpoint.loader_position import LoaderPosition
from shardtrain.checkpoint.pointer import LAST, other_checkpoints, point_last_at, resolve_checkpoint
from shardtrain.checkpoint.provenance import CHECKPOINT_PROVENANCE, model_provenance
from shardtrain.engine.engine import Engine
from shardtrain.errors import CheckpointError, ConfigError, DamagedCheckpointError
from shardtrain.from_checkpoint import CHECKPOINT_HPARAMS
from shardtrain.hparams import checkpoint_entries

if TYPE_CHECKING:
    from shardtrain.trainer.trainer import Trainer


class TrainerCheckpoints:
    """Saves and restores the Trainer's state under ``<root_dir>/checkpoints``."""

    def __init__(self, engine: Engine, root_dir: Path) -> None:
        self.engine = engine
        self.directory = root_dir / "checkpoints"
        #: (global step, path) of the latest save, so that a preemption right after it does not save twice.
        self.last_saved: tuple[int, Path] | None = None

    def save(
        self,
        state: dict[str, Any],
        step: int,
        path: str | os.PathLike | None,
        asynchronous: bool,
        trainable_only: bool = False,
    ) -> Path:
        """Save ``state`` at ``path`` (default ``step=<step>``); ``last`` names it once committed.
        ``trainable_only``: the model's trainable parameters only; the checkpoint names the pretrained
        directory the frozen rest comes from, and refuses to load without it."""
        target = Path(path) if path is not None else self.directory / f"step={step}"
        directory = self.directory
        self.engine.progress(step, "checkpoint")
        if trainable_only and not state.get(CHECKPOINT_PROVENANCE, {}).get("model"):
            raise ConfigError(
                "trainable_only checkpoints hold the adapters, not the frozen weights, which must come from a "
                "pretrained model the run read (shardtrain.hf.from_pretrained in configure_model()); this model "
                "was not read from one: save the whole model (trainable_only=False)"
            )
        self.engine.save(
            target,
            state,
            asynchronous=asynchronous,
            on_commit=lambda committed: point_last_at(directory, committed),
            trainable_only=trainable_only,
        )
        self.last_saved = (step, target)
        return target

    def resolve(self, ckpt_path: str | os.PathLike) -> Path | None:
        """The checkpoint ``ckpt_path`` names; None for ``"last"`` before any save (said on rank 0). For ``"last"``,
        the newest checkpoint that verifies: when the one ``last`` names is damaged, the newest earlier one that
        is not (said on rank 0); every rank calls this (the ranks verify together)."""
        path = resolve_checkpoint(ckpt_path, self.directory)
        if path is None and self.engine.is_global_zero:
            # The same command starts a job and its restarts (torchrun --max-restarts, a requeued
            # SLURM job): the first attempt has nothing to resume from. Lightning does the same.
            print(
                f"[shardtrain] ckpt_path='last' but no checkpoint was saved in {self.directory} yet; training starts from the beginning",
                flush=True,
            )
        if path is not None and str(ckpt_path) == LAST and not is_weights_file(path):
            return self._newest_that_verifies(path)
        return path

    def _newest_that_verifies(self, path: Path) -> Path:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as error:
            damaged = error
        for candidate in other_checkpoints(path, self.directory):
            try:
                verify_checkpoint(candidate)
            except CheckpointError:
                continue
            if self.engine.is_global_zero:
                what = "; ".join(damaged.problems) if isinstance(damaged, DamagedCheckpointError) else str(damaged)
                print(
                    f"[shardtrain] ckpt_path='last': {path} is damaged ({what})\n[shardtrain] resuming from "
                    f"{candidate} instead, the newest earlier checkpoint that verifies",
                    flush=True,
                )
            return candidate
        raise CheckpointError(
            f"{damaged}; no earlier checkpoint in {path.parent} or {self.directory} verifies either: start without "
            "ckpt_path, or restore a copy of the checkpoint"
        ) from damaged

    def state_of(self, trainer: "Trainer", weights_only: bool = False) -> dict[str, Any]:
        """What a checkpoint of ``trainer`` holds, read from its public attributes; loading fills it in place.
        ``weights_only``: the model, the loop position, the run's config and hyperparameters (no optimizer state)."""
        state: dict[str, Any] = {
            "module": trainer.model,
            "optimizers": list(trainer.optimizers),
            "lr_schedulers": [config.scheduler for config in trainer.lr_schedulers],
            "loop": {
                "global_step": trainer.global_step,
                "batches_that_stepped": trainer.batches_that_stepped,
                "current_epoch": trainer.current_epoch,
                "batches_seen_in_epoch": trainer.batches_seen_in_epoch,
            },
            "callbacks": {callback.state_key: callback.state_dict() for callback in trainer.callbacks},
            "trainer_config": {
                **trainer.args.to_json(),
                "strategy": repr(self.engine.strategy),
                "world_size": self.engine.world_size,
                **({"run": trainer.run_config} if trainer.run_config is not None else {}),
            },
        }
        hparams = {
            owner: checkpoint_entries(obj)
            for owner, obj in (("module", trainer.module), ("datamodule", trainer.datamodule))
            if obj is not None and checkpoint_entries(obj)
        }
        if hparams:  # JSON, for load_from_checkpoint (shardtrain.from_checkpoint)
            state[CHECKPOINT_HPARAMS] = hparams
        provenance = model_provenance(trainer.module) if trainer.module is not None else {}
        if provenance:  # JSON: the pretrained directory and peft adapters, for exports (shardtrain.hf.export)
            state[CHECKPOINT_PROVENANCE] = provenance
        if weights_only:
            kept = ("module", "loop", "trainer_config", CHECKPOINT_HPARAMS, CHECKPOINT_PROVENANCE)
            return {key: state[key] for key in kept if key in state}
        datamodule = trainer.datamodule
        if datamodule is not None and datamodule.state_dict():  # Lightning saves a DataModule's non-empty state
            state["datamodule"] = datamodule
        scaler = self.engine.precision.grad_scaler(self.engine.device.type)
        if scaler is not None:
            state["grad_scaler"] = scaler
        loader = trainer.train_loader
        if loader is not None and loader.position() is not None:
            state["train_dataloader"] = LoaderPosition(loader, self.engine.global_rank, self.engine.world_size)
        return state

    def load_weights(self, path: Path, trainer: "Trainer") -> None:
        """Load only the model's weights (for ``validate``/``test``/``predict`` with ``ckpt_path``): from a checkpoint
        of any strategy and world size, or from consolidated weights; the optimizers and the loop are left alone."""
        if is_weights_file(path):
            self.engine.load_weights(trainer.model, load_weights(path))
        else:
            self.engine.load(path, {"module": trainer.model})

    def restore(self, path: Path, trainer: "Trainer") -> dict[str, Any] | None:
        """Load ``path`` into ``trainer``: its model, optimizers, schedulers, callbacks and loop position;
        returns the loaded state. Consolidated weights (safetensors) only initialise the model (the
        run starts at step 0): then None."""
        state = self.state_of(trainer)
        if is_weights_file(path):
            self.engine.load_weights(state["module"], load_weights(path))
            return None
        meta = read_meta(path)
        saved = meta["state"]
        if meta.get("trainable_only"):  # the frozen weights are the run's own: they must be the saved run's base
            base = saved.get(CHECKPOINT_PROVENANCE, {}).get("model")
            ours = model_provenance(trainer.module).get("model") if trainer.module is not None else None
            if base != ours:
                raise CheckpointError(
                    f"{path} holds only the adapters trained on the pretrained model {base}; this run's model was "
                    f"read from {ours or 'no pretrained model'}: read the same base (from_pretrained({base!r}))"
                )
        for optional in ("grad_scaler", "train_dataloader", "datamodule", CHECKPOINT_HPARAMS, CHECKPOINT_PROVENANCE):
            # Saved under another precision (no loss scaling: the scaler starts fresh), or with a
            # plain loader (the data loader reads up to the position): not in this checkpoint.
            if optional in state and optional not in saved:
                del state[optional]
        if "datamodule" in saved and trainer.datamodule is not None:  # its state may be empty until it is loaded
            state["datamodule"] = trainer.datamodule
        self.engine.load(path, state)
        for callback in trainer.callbacks:
            if callback.state_key in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][callback.state_key])
        loop = state["loop"]
        trainer.global_step = loop["global_step"]
        trainer.batches_that_stepped = loop.get("batches_that_stepped", loop["global_step"])  # older checkpoints
        trainer.current_epoch = loop["current_epoch"]
        trainer.batches_seen_in_epoch = loop["batches_seen_in_epoch"]
        return state
