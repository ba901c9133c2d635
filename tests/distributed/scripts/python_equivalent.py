"""The run of tests/distributed/configs/tiny.yaml, built in Python: the CLI must give the same losses."""

import argparse

from examples.gpt.data import CorpusData
from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()
data = CorpusData(seq_len=32, batch_size=4, shuffle=True, limit_samples=512)
trainer = Trainer(
    accelerator="cpu",
    devices=2,
    strategy="fsdp",
    max_steps=5,
    log_every_n_steps=1,
    seed=7,
    default_root_dir=args.out,
    enable_progress_bar=False,
)
trainer.fit(
    GPTModule(GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=32), learning_rate=0.003, warmup_steps=3),
    data.train_dataloader(),
    data.val_dataloader(),
)
