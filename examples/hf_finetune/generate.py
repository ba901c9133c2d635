"""Continue a prompt with an exported model, in plain transformers (no shardtrain involved).

    python examples/hf_finetune/generate.py runs/hf_finetune/exported
    python examples/hf_finetune/generate.py runs/hf_finetune/exported --prompt "Mr. Darcy" --tokens 60

Greedy decoding: the same text on every run.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model directory, e.g. the output of `shardtrain consolidate --format hf`")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens to generate")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
