"""LoRA through peft, in one process: adapters made on the meta device are initialised as peft initialises
them on a device (same random stream), peft's renamed tensors still read the pretrained weights, and the
refusals name the fix."""

from __future__ import annotations

import sys

import pytest
import torch

from shardtrain.errors import CheckpointError, ConfigError, MissingDependencyError
from shardtrain.parallel.materialize import materialize

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from shardtrain.hf import from_pretrained, with_lora  # noqa: E402

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _config():
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_config()).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_adapters_built_on_meta_start_as_peft_makes_them_on_a_device(pretrained):
    torch.manual_seed(3)
    on_device = with_lora(from_pretrained(pretrained), LORA)  # read at once, adapters drawn by peft
    with torch.device("meta"):
        lazy = with_lora(from_pretrained(pretrained), LORA)  # nothing real yet
    assert all(t.is_meta for t in lazy.parameters())
    torch.manual_seed(3)
    materialize(lazy, torch.device("cpu"))  # what a sharding strategy does on each rank
    expected = on_device.state_dict()
    got = lazy.state_dict()
    assert set(got) == set(expected) and any(".base_layer." in name for name in got)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name
    assert all(not expected[n].any() for n in expected if "lora_B" in n)  # B starts at zero: the pretrained model
    assert [n for n, p in lazy.named_parameters() if p.requires_grad] == [
        n for n, p in on_device.named_parameters() if p.requires_grad
    ]


def test_initialisations_computed_from_the_pretrained_weights_are_refused_on_meta(pretrained):
    with torch.device("meta"):
        lazy = with_lora(from_pretrained(pretrained), {**LORA, "init_lora_weights": "pissa"})
    with pytest.raises(ConfigError, match=r"init_lora_weights='pissa'.*use init_lora_weights=True or 'gaussian'"):
        materialize(lazy, torch.device("cpu"))


def test_a_bf16_base_is_read_as_stored_on_meta_and_on_a_device(pretrained):
    """frozen_dtype: the frozen base in bf16, the adapters in fp32; the same values whether made on a device or on meta."""
    on_device = with_lora(from_pretrained(pretrained), LORA, frozen_dtype="bf16")
    with torch.device("meta"):
        lazy = with_lora(from_pretrained(pretrained), LORA, frozen_dtype=torch.bfloat16)
    materialize(lazy, torch.device("cpu"))
    for model in (on_device, lazy):
        dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
        assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    files = transformers.LlamaForCausalLM.from_pretrained(pretrained, dtype=torch.bfloat16).state_dict()
    for name, tensor in lazy.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, files[name.removeprefix("base_model.model.").replace(".base_layer.", ".")]), name


def test_frozen_dtype_applies_to_freezes_patterns_too(pretrained):
    """Without LoRA, CausalLM(freeze=..., frozen_dtype=...) stores exactly the frozen parameters in that dtype."""
    from shardtrain.hf import CausalLM

    module = CausalLM(str(pretrained), freeze=["model.embed_tokens.*"], frozen_dtype="bf16")
    module.configure_model()
    dtypes = {name: p.dtype for name, p in module.model.named_parameters()}
    assert dtypes.pop("model.embed_tokens.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}


def test_bad_frozen_dtypes_name_the_fix(pretrained):
    from shardtrain.hf import CausalLM

    with pytest.raises(ConfigError, match=r"frozen_dtype='bf17' is not a floating-point dtype; use one of bf16"):
        CausalLM(str(pretrained), lora=LORA, frozen_dtype="bf17")
    with pytest.raises(ConfigError, match=r"frozen_dtype applies to frozen weights, and none are: pass lora or freeze"):
        CausalLM(str(pretrained), frozen_dtype="bf16")
    with pytest.raises(ConfigError, match=r"frozen_dtype=torch.int8 is not a floating-point dtype"):
        with_lora(from_pretrained(pretrained), LORA, frozen_dtype=torch.int8)


def test_bad_options_name_the_fix(pretrained):
    model = from_pretrained(pretrained)
    with pytest.raises(ConfigError, match=r"alpha is not an option of peft's LoraConfig.*lora_alpha"):
        with_lora(model, {"r": 4, "alpha": 8})
    with pytest.raises(ConfigError, match=r"match no layer of LlamaForCausalLM; its linear layers are named .*q_proj"):
        with_lora(from_pretrained(pretrained), {"r": 4, "target_modules": ["query"]})


def test_without_peft_the_error_gives_the_install_command(pretrained, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'shardtrain\[peft\]'"):
        with_lora(from_pretrained(pretrained), LORA)


def _fit(root, model_dir, lora, max_steps, ckpt_path=None):
    from torch.utils.data import DataLoader

    from shardtrain import Trainer
    from shardtrain.hf import CausalLM

    blocks = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in blocks]
    trainer = Trainer(
        accelerator="cpu", default_root_dir=root, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(
        CausalLM(str(model_dir), learning_rate=1e-3, lora=lora), DataLoader(data, batch_size=4), ckpt_path=ckpt_path
    )
    return trainer


def test_an_adapter_only_checkpoint_refuses_another_adapter_layout_or_base(pretrained, tmp_path):
    saved = _fit(tmp_path / "run", pretrained, LORA, max_steps=1).save_checkpoint(trainable_only=True)
    resumed = _fit(tmp_path / "same", pretrained, LORA, max_steps=2, ckpt_path=saved)
    assert resumed.global_step == 2
    with pytest.raises(CheckpointError, match=r"holds only the trainable parameters.*not this model's"):
        _fit(tmp_path / "other", pretrained, {**LORA, "target_modules": ["q_proj"]}, max_steps=2, ckpt_path=saved)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(_config()).save_pretrained(tmp_path / "another")
    with pytest.raises(CheckpointError, match=r"only the adapters trained on the pretrained model .*llama"):
        _fit(tmp_path / "base", tmp_path / "another", LORA, max_steps=2, ckpt_path=saved)


def test_a_model_not_read_from_pretrained_files_cannot_save_adapters_only(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from shardtrain import Trainer
    from tests.unit.linear_module import LinearRegression

    x = torch.randn(8, 4)
    trainer = Trainer(
        accelerator="cpu", default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False
    )
    trainer.fit(LinearRegression(lr=0.1), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4))
    with pytest.raises(ConfigError, match=r"trainable_only checkpoints hold the adapters.*save the whole model"):
        trainer.save_checkpoint(trainable_only=True)


def test_adapters_on_a_users_own_module_start_as_on_a_device():
    """A module of one's own (no pretrained weights) wrapped by peft: made on meta and materialised, the base is
    initialised first and the adapters after it, as when peft wraps a model already made on a device."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q", "v"]}
    torch.manual_seed(5)
    on_device = get_peft_model(Net(), LoraConfig(**config))
    with torch.device("meta"):
        lazy = get_peft_model(Net(), LoraConfig(**config))
    torch.manual_seed(5)
    materialize(lazy, torch.device("cpu"))
    expected = on_device.state_dict()
    for name, tensor in lazy.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_exporting_adapters_onto_another_base_is_refused(pretrained, tmp_path):
    from shardtrain.hf.export import export_hf

    saved = _fit(tmp_path / "run", pretrained, LORA, max_steps=1).save_checkpoint()
    wider = transformers.LlamaConfig(**{**_config().to_dict(), "hidden_size": 64, "intermediate_size": 128})
    transformers.LlamaForCausalLM(wider).save_pretrained(tmp_path / "wider")
    with pytest.raises(CheckpointError, match=r"do not fit the model in .*wider.*pass --hf-config the base model"):
        export_hf(saved, tmp_path / "out", config=tmp_path / "wider", merge_adapters=True)
    assert export_hf(saved, tmp_path / "adapters", config=pretrained)  # its own base: fine
