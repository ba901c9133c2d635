"""W&B (offline) and MLflow (a local file store) loggers given to the Trainer, as a Lightning user writes them:
what the runs hold, read back from their local files, and the logger properties a module sees."""

from __future__ import annotations

import os

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.seen: dict = {}

    def on_train_start(self) -> None:
        self.seen = {"logger": type(self.logger).__name__, "name_is_str": isinstance(self.logger.name, str)}
        self.seen["version_is_str"] = isinstance(self.logger.version, str)
        self.logger.log_hyperparams({"lr": 0.1, "nested": {"width": 8}})

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(root: str, logger, **trainer_kwargs) -> Regression:
    torch.manual_seed(0)
    module = Regression()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(default_root_dir=root, logger=logger, max_steps=3, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(module, DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4))
    return module


def wandb_records(path: str) -> list:
    """The records of a ``.wandb`` file (W&B's log: 7-byte header, then chunks in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            chunk, pending = pending + chunk, b""
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
        elif kind in (2, 3):
            pending += chunk
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def experiment_wandb(root: str, **trainer_kwargs) -> dict:
    import glob

    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=root, project="port", offline=True)
    module = fit(root, logger, **trainer_kwargs)
    seen = {**module.seen, "name": logger.name, "save_dir": os.path.relpath(logger.save_dir, root)}
    run_id = logger.version
    wandb.finish()
    (path,) = glob.glob(os.path.join(root, "wandb", "offline-run-*", f"run-{run_id}.wandb"))
    config, history = {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        # The hyperparameters are a config record, or (when wandb's service batches them before the run record
        # is written: seen once in CI under load) part of the run record itself.
        if kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({_key(item): item.value_json for item in updates if not _key(item).startswith("_")})
        elif kind == "history":
            history.append(
                {_key(item): item.value_json for item in record.history.item if not _key(item).startswith("_")}
            )
    return {"seen": seen, "config": config, "history": history}


def experiment_mlflow(root: str, **trainer_kwargs) -> dict:
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = "sqlite:///" + os.path.join(root, "mlflow.db")  # a local store (MLflow 3 refuses file: stores by default)
    logger = MLFlowLogger(experiment_name="port", run_name="first", tracking_uri=uri)
    module = fit(root, logger, **trainer_kwargs)
    run = MlflowClient(uri).get_run(logger.run_id)
    history = {
        key: [[m.step, m.value] for m in MlflowClient(uri).get_metric_history(logger.run_id, key)]
        for key in run.data.metrics
    }
    seen = {**module.seen, "save_dir": logger.save_dir}
    return {
        "seen": seen,
        "params": dict(run.data.params),
        "history": history,
        "status": run.info.status,
        "run_name": run.data.tags.get("mlflow.runName"),
    }


def experiment(root: str, **trainer_kwargs) -> dict:
    service = trainer_kwargs.pop("service")
    return {"wandb": experiment_wandb, "mlflow": experiment_mlflow}[service](root, **trainer_kwargs)
