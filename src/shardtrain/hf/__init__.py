"""Hugging Face models: pretrained checkpoints read straight into each rank's shards, and exported back.

Needs the ``hf`` extra (``pip install 'shardtrain[hf]'``): transformers and safetensors.
Importing this package does not import transformers; using it without transformers raises
``MissingDependencyError`` with the install command.
"""

from shardtrain.hf.adapters import keep_frozen_in, with_lora
from shardtrain.hf.causal_lm import CausalLM
from shardtrain.hf.pretrained import from_pretrained
from shardtrain.hf.text_data import TextData

__all__ = ["from_pretrained", "with_lora", "keep_frozen_in", "CausalLM", "TextData"]
