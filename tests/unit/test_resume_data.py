"""Resuming mid-epoch in one process: the batches already trained on are not loaded again, and
the order and the loss curve are those of the uninterrupted run."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from shardtrain import Callback, TrainModule, Trainer
from shardtrain import data as shardtrain_data

SAMPLES, BATCH = 160, 4  # 40 batches per epoch
STOP, END = 30, 60  # resume at a late step of the first epoch, finish in the second


def _sample(index):
    g = torch.Generator().manual_seed(index)
    x = torch.randn(4, generator=g)
    return x, x.sum(dim=0, keepdim=True).sin()


class CountingDataset(Dataset):
    """Map-style; records every index it loads."""

    def __init__(self):
        self.loaded = []

    def __len__(self):
        return SAMPLES

    def __getitem__(self, index):
        self.loaded.append(index)
        return _sample(index)


class CountingStream(IterableDataset):
    """Iterable; records every sample it makes. With ``resumable``, it has a state_dict (for StatefulDataLoader)."""

    def __init__(self, resumable=False):
        self.made = []
        self.next_index = 0
        if resumable:
            self.state_dict = lambda: {"next_index": self.next_index}
            self.load_state_dict = lambda state: setattr(self, "next_index", state["next_index"])

    def __iter__(self):
        while self.next_index < SAMPLES:
            index, self.next_index = self.next_index, self.next_index + 1
            self.made.append(index)
            yield _sample(index)
        self.next_index = 0  # the next epoch starts from the beginning


class Dropout(TrainModule):
    """Dropout makes each step draw from the RNG, so a resumed run must also restore the RNG exactly."""

    def configure_model(self):
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Losses(Callback):
    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = float(outputs.detach())


def _fit(root, loader, max_steps, ckpt_path=None):
    losses = Losses()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=root,
        log_every_n_steps=1,
        seed=3,
        enable_progress_bar=False,
        callbacks=[losses],
    )
    trainer.fit(Dropout(), loader, ckpt_path=ckpt_path)
    return trainer, losses.by_step


def _full_and_resumed(tmp_path, make_loader):
    full_data, loader = make_loader()
    _, full = _fit(tmp_path / "full", loader, END)
    _, loader = make_loader()
    trainer, _ = _fit(tmp_path / "part", loader, STOP)
    trainer.save_checkpoint()
    resumed_data, loader = make_loader()
    trainer, resumed = _fit(tmp_path / "part", loader, END, ckpt_path="last")
    assert trainer.global_step == END and sorted(resumed) == list(range(STOP + 1, END + 1))
    assert [resumed[step] for step in sorted(resumed)] == pytest.approx([full[s] for s in sorted(resumed)], abs=1e-7)
    return full_data, resumed_data


def test_shuffled_map_style_resume_skips_by_index_and_continues_the_curve(tmp_path):
    def make_loader():
        dataset = CountingDataset()
        return dataset, DataLoader(dataset, batch_size=BATCH, shuffle=True)

    full, resumed = _full_and_resumed(tmp_path, make_loader)
    # The uninterrupted run loaded END batches; the resumed one only the last END - STOP of them, in the same order.
    assert len(full.loaded) == END * BATCH
    assert resumed.loaded == full.loaded[STOP * BATCH :]
    assert sorted(full.loaded[:SAMPLES]) == list(range(SAMPLES))  # one epoch is a permutation


def test_iterable_resume_with_a_plain_loader_reads_up_to_the_position_and_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(shardtrain_data, "_warned_reading_to_resume", False)

    def make_loader():
        dataset = CountingStream()
        return dataset, DataLoader(dataset, batch_size=BATCH)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full, resumed = _full_and_resumed(tmp_path, make_loader)
    about_resume = [w for w in caught if "StatefulDataLoader" in str(w.message)]
    assert len(about_resume) == 1 and "reads and discards the 30 batches" in str(about_resume[0].message)
    assert resumed.made == list(range(SAMPLES)) + list(range((END - 40) * BATCH))  # read from the start


def test_iterable_resume_with_a_stateful_dataloader_continues_from_its_saved_position(tmp_path, monkeypatch):
    stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
    monkeypatch.setattr(shardtrain_data, "_warned_reading_to_resume", False)

    def make_loader():
        dataset = CountingStream(resumable=True)
        return dataset, stateful_dataloader.StatefulDataLoader(dataset, batch_size=BATCH)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full, resumed = _full_and_resumed(tmp_path, make_loader)
    assert not [w for w in caught if "reads and discards" in str(w.message)]
    assert resumed.made == full.made[STOP * BATCH :]  # nothing before the position was made again
    assert resumed.made[0] == STOP * BATCH


class EveryOtherFirst:
    """A custom batch sampler (not a BatchSampler): even indices first, in batches of 3."""

    def __iter__(self):
        order = list(range(0, SAMPLES, 2)) + list(range(1, SAMPLES, 2))
        return (order[i : i + 3] for i in range(0, SAMPLES, 3))

    def __len__(self):
        return -(-SAMPLES // 3)


def test_a_custom_batch_sampler_is_skipped_by_batch_without_loading(tmp_path):
    full_data, resumed_data = CountingDataset(), CountingDataset()
    full = list(shardtrain_data.DeviceDataLoader(DataLoader(full_data, batch_sampler=EveryOtherFirst()), "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process: no warning about sharding a custom sampler
        loader = shardtrain_data.with_distributed_sampler(
            DataLoader(resumed_data, batch_sampler=EveryOtherFirst()), 1, 0, 0
        )
    device_loader = shardtrain_data.DeviceDataLoader(loader, "cpu")
    assert len(device_loader) == len(full) and device_loader.batch_size is None
    device_loader.start_at(40)
    resumed = list(device_loader)
    assert resumed_data.loaded == full_data.loaded[40 * 3 :]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full[40:], strict=True))
    assert len(list(device_loader)) == len(full)  # the next epoch starts from the beginning
