"""shardtrain.hf in one process: checkpoint key checks, lazy (meta) models, direct loads."""

from __future__ import annotations

import pytest
import torch

from shardtrain.errors import CheckpointError
from shardtrain.parallel.weight_source import has_weight_sources
from tests.distributed.hf_models import save_gpt2, save_llama, token_blocks

transformers = pytest.importorskip("transformers", reason="install the extra: pip install 'shardtrain[hf]'")
from shardtrain.hf import from_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_a_direct_load_equals_transformers_own(request, which):
    directory = request.getfixturevalue(which)
    ours = from_pretrained(directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(ours) is type(theirs) and next(ours.parameters()).dtype == torch.float32  # bf16 files, fp32 weights
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    batch = token_blocks()[:2]
    with torch.no_grad():
        assert ours(input_ids=batch).logits.equal(theirs(input_ids=batch).logits)
    if which == "gpt2":
        assert ours.lm_head.weight is ours.transformer.wte.weight


def test_under_the_meta_device_nothing_is_read_until_the_strategy_lays_the_model_out(llama):
    with torch.device("meta"):
        model = from_pretrained(llama)
    assert all(p.is_meta for p in model.parameters())
    assert has_weight_sources(model)


def test_a_checkpoint_of_another_model_is_refused_naming_the_keys(llama):
    with pytest.raises(CheckpointError, match=r"missing 9 keys \(model\.layers\.2\.") as missing:
        from_pretrained(llama, num_hidden_layers=3)
    assert "LlamaForCausalLM" in str(missing.value)
    with pytest.raises(CheckpointError, match=r"unexpected 9 keys \(model\.layers\.1\."):
        from_pretrained(llama, num_hidden_layers=1)


def test_a_base_model_checkpoint_without_the_prefix_loads(gpt2, tmp_path):
    base = transformers.GPT2LMHeadModel.from_pretrained(gpt2).transformer  # keys without "transformer."
    base.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((gpt2 / "config.json").read_text())
    model = from_pretrained(tmp_path)
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, base.h[1].mlp.c_fc.weight)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_pickle_checkpoints_are_refused_and_missing_directories_named(tmp_path, gpt2):
    (tmp_path / "config.json").write_text((gpt2 / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: pickle files are not loaded"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        from_pretrained("nobody/no-such-model")


def test_a_hub_id_resolves_to_its_snapshot_in_the_local_cache(gpt2, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    snapshot = tmp_path / "models--tiny--gpt2" / "snapshots" / "0123abcd"
    shutil.copytree(gpt2, snapshot)
    (tmp_path / "models--tiny--gpt2" / "refs").mkdir()
    (tmp_path / "models--tiny--gpt2" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = from_pretrained("tiny/gpt2")
    assert model.name_or_path == "tiny/gpt2"
    expected = transformers.GPT2LMHeadModel.from_pretrained(gpt2)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, expected.transformer.h[0].attn.c_attn.weight)


def test_without_transformers_the_error_names_the_extra(monkeypatch, gpt2):
    import sys

    from shardtrain.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "transformers", None)  # what a missing package looks like to import
    with pytest.raises(MissingDependencyError, match=r"pip install 'shardtrain\[hf\]'"):
        from_pretrained(gpt2)


def test_other_shapes_and_a_class_of_another_model_are_refused_before_anything_is_read(llama, gpt2):
    from shardtrain.errors import ConfigError

    with pytest.raises(
        CheckpointError,
        match=r"shapes differ for 2 keys \(model\.embed_tokens\.weight: checkpoint \(256, 64\), model \(300, 64\)",
    ):
        from_pretrained(llama, vocab_size=300)
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM cannot be built from .*GPT2Config.*pass the model_class"):
        from_pretrained(gpt2, model_class=transformers.LlamaForCausalLM)
