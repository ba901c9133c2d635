"""The DeepSpeed config a run gets, and every bad input's error, all before any process starts."""

import importlib.util
import json
import warnings

import pytest

from shardtrain import Trainer
from shardtrain.errors import ConfigError, MissingDependencyError
from shardtrain.strategies.base import TrainingSettings
from shardtrain.strategies.deepspeed.config import DeepSpeedOptions, build_config, evaluation_config

pytest.importorskip("deepspeed", reason="install the extra: pip install 'shardtrain[deepspeed]'")


def _build(options=None, config=None, precision="32-true", world_size=1, **training):
    return build_config(
        DeepSpeedOptions(**(options or {})),
        config,
        TrainingSettings(**training),
        precision=precision,
        world_size=world_size,
    )


def test_the_trainer_settings_are_written_for_the_user():
    config = _build(
        {"stage": 3},
        precision="bf16-mixed",
        micro_batch_size=4,
        accumulate_grad_batches=2,
        gradient_clip_val=1.5,
        world_size=8,
    )
    assert config["zero_optimization"]["stage"] == 3
    assert (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
        config["train_batch_size"],
    ) == (4, 2, 64)
    assert config["gradient_clipping"] == 1.5 and config["bf16"] == {"enabled": True} and "fp16" not in config


def test_no_clipping_is_written_explicitly_because_deepspeed_defaults_to_1():
    assert _build()["gradient_clipping"] == 0.0


def test_auto_values_resolve_silently_and_concrete_ones_are_replaced_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = _build(
            config={
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "bf16": {"enabled": "auto"},
            },
            micro_batch_size=2,
        )
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["bf16"]["enabled"] is False
    with pytest.warns(UserWarning, match=r"gradient_accumulation_steps: 8 -> 1"):
        _build(config={"gradient_accumulation_steps": 8})


def test_named_options_win_over_the_file_and_say_which_keys():
    with pytest.warns(UserWarning, match=r"zero_optimization.stage: 1 -> 3"):
        config = _build({"stage": 3}, {"zero_optimization": {"stage": 1, "overlap_comm": False}})
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": False}


def test_offload_options_become_deepspeed_sections(tmp_path):
    config = _build(
        {
            "stage": 3,
            "offload_optimizer": True,
            "offload_parameters": True,
            "offload_params_device": "nvme",
            "nvme_path": str(tmp_path),
        }
    )
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": str(tmp_path), "pin_memory": False}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stage": 4}, "there is no stage 4"),
        ({"stage": 3, "offload_parameters": True, "offload_params_device": "nvme"}, "no nvme_path is set"),
        ({"stage": 2, "offload_parameters": True}, "offloading parameters needs ZeRO stage 3"),
        (
            {"stage": 2, "offload_optimizer": True, "offload_optimizer_device": "nvme", "nvme_path": "/tmp"},
            "would silently offload",
        ),
        ({"offload_optimizer_device": "disk"}, "must be 'cpu' or 'nvme'"),
    ],
)
def test_bad_options_name_the_fix(options, message):
    with pytest.raises(ConfigError, match=message):
        _build(options)


def test_a_config_file_that_does_not_parse_shows_the_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {\n    "stage": 3,\n  }\n}\n')
    with pytest.raises(ConfigError, match=r"line 4, column 3") as error:
        _build(config=str(path))
    assert str(path) in str(error.value) and "  }" in str(error.value)


def test_errors_come_from_the_trainer_before_any_process_group():
    import torch.distributed as dist

    from shardtrain import DeepSpeedStrategy

    with pytest.raises(ConfigError, match="there is no stage 4"):
        Trainer(accelerator="cpu", devices=2, strategy=DeepSpeedStrategy(stage=4))
    with pytest.raises(ConfigError, match="nvme_path"):
        Trainer(accelerator="cpu", devices=2, strategy="deepspeed_stage_3_offload_nvme")
    with pytest.raises(ConfigError, match="clips gradients by norm only"):
        Trainer(
            accelerator="cpu", devices=2, strategy="deepspeed", gradient_clip_val=1.0, gradient_clip_algorithm="value"
        )
    assert not dist.is_initialized()


def test_missing_deepspeed_names_the_install_command(monkeypatch):
    from shardtrain import DeepSpeedStrategy

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install 'shardtrain\[deepspeed\]'"):
        DeepSpeedStrategy()


def test_a_config_dict_is_not_modified():
    given = {"zero_optimization": {"stage": 1}}
    with pytest.warns(UserWarning, match="zero_optimization.stage"):
        _build({"stage": 2}, given)
    assert given == {"zero_optimization": {"stage": 1}}
    assert json.dumps(_build(config=given))  # JSON-serialisable, as DeepSpeed needs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_an_engine_set_up_for_evaluation_keeps_the_precision_and_zero_3_only(stage):
    """ZeRO-1/2 refuse to start without an optimizer (and partition nothing evaluation uses); ZeRO-3's parameters
    stay partitioned, so its section is kept (as Lightning's DeepSpeed inference config)."""
    config = _build({"stage": stage, "offload_parameters": stage == 3}, precision="bf16-mixed", micro_batch_size=4)
    evaluation = evaluation_config(config)
    assert evaluation["bf16"] == {"enabled": True}
    assert evaluation["train_micro_batch_size_per_gpu"] == 4
    assert ("zero_optimization" in evaluation) == (stage == 3)
    if stage == 3:
        assert evaluation["zero_optimization"] == config["zero_optimization"]
    assert "gradient_clipping" not in evaluation and "gradient_accumulation_steps" not in evaluation
