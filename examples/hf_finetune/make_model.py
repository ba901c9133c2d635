"""Make a small Hugging Face model to fine-tune, with no hub: a byte-level BPE tokenizer trained on
the GPT example's corpus, a randomly initialised Llama, and the corpus as a plain text file.

    python examples/hf_finetune/make_model.py        # runs/hf_finetune/pretrained and runs/hf_finetune/train.txt

The model directory is what ``from_pretrained`` reads (``config.json``, ``model.safetensors``, the
tokenizer files), so ``finetune.yaml`` runs exactly as it would on a downloaded checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `examples` importable from a checkout

import torch  # noqa: E402

from examples.gpt.data import CORPUS, load_corpus  # noqa: E402

END_OF_TEXT = "<|endoftext|>"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/hf_finetune/pretrained", help="the model directory to write")
    parser.add_argument("--text", default="runs/hf_finetune/train.txt", help="the training text file to write")
    parser.add_argument(
        "--text-bytes", type=int, default=None, help="write only the first this many bytes of the corpus (tests)"
    )
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def train_tokenizer(text: str, vocab_size: int):
    """A GPT-2-style byte-level BPE: every string encodes, and ``<|endoftext|>`` separates documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT)


def make_model(tokenizer, seed: int):
    """A 4-layer Llama (grouped-query attention: 4 heads, 2 key-value heads) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    corpus = load_corpus(CORPUS)
    if args.text_bytes is not None:
        corpus = corpus[: args.text_bytes]
    text = corpus.decode("utf-8", errors="ignore")  # a cut may split a character
    tokenizer = train_tokenizer(text, args.vocab_size)
    model = make_model(tokenizer, args.seed)
    out = Path(args.out)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    text_file = Path(args.text)
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text(text, encoding="utf-8")
    parameters = sum(p.numel() for p in model.parameters())
    tokens = len(tokenizer(text)["input_ids"])
    print(f"tokenizer: {len(tokenizer)} tokens (eos/bos {END_OF_TEXT!r} = {tokenizer.eos_token_id})")
    print(f"model: {type(model).__name__}, {parameters / 1e6:.2f}M parameters -> {out}")
    print(
        f"text: {len(text.encode()) / 1e6:.2f} MB, {tokens} tokens ({len(text) / tokens:.2f} chars each) -> {text_file}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
