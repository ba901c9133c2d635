"""Run configs: every strategy reachable, overrides win, bad configs get errors that name the fix."""

import textwrap

import pytest
import yaml

from shardtrain import ConfigError, StrategyError, available_strategies
from shardtrain.config import dump, instantiate, parse

MODEL = ["--model.class_path", "examples.gpt.model.GPTModule"]


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("name", sorted(available_strategies()))
def test_every_registered_strategy_is_reachable(tmp_path, name):
    devices = 1 if name == "single" else 2
    extra = f", nvme_path: {tmp_path}" if name.endswith("nvme") else ""  # disk offload needs a place for its files
    config = parse(
        "fit",
        [
            "--config",
            _write(tmp_path, f"trainer: {{accelerator: cpu, devices: {devices}}}\nstrategy: {{name: {name}{extra}}}\n"),
            *MODEL,
        ],
    )
    trainer, model, data = instantiate(config)
    from shardtrain.strategies.registry import strategy_factory

    assert isinstance(trainer.strategy, strategy_factory(name))
    assert type(model).__name__ == "GPTModule" and data is None


def test_strategy_options_and_command_line_overrides(tmp_path):
    path = _write(
        tmp_path,
        "trainer: {accelerator: cpu, devices: 2, max_steps: 100}\nstrategy: {name: fsdp, sharding_strategy: FULL_SHARD}\n",
    )
    config = parse(
        "fit",
        [
            "--config",
            path,
            *MODEL,
            "--trainer.max_steps",
            "7",
            "--strategy.sharding_strategy",
            "SHARD_GRAD_OP",
            "--strategy.cpu_offload=true",
        ],
    )
    trainer, _, _ = instantiate(config)
    assert trainer.max_steps == 7
    assert (trainer.strategy.sharding_strategy, trainer.strategy.cpu_offload) == ("SHARD_GRAD_OP", True)


def test_print_config_round_trips(tmp_path):
    config = parse(
        "fit",
        [
            "--config",
            _write(tmp_path, "trainer: {accelerator: cpu, max_steps: 3}\nstrategy: {name: single}\n"),
            *MODEL,
            "--model.init_args.learning_rate",
            "0.01",
        ],
    )
    first = dump(config)
    again = tmp_path / "again.yaml"
    again.write_text(first)
    assert dump(parse("fit", ["--config", str(again)])) == first
    resolved = yaml.safe_load(first)
    assert resolved["trainer"]["log_every_n_steps"] == 50  # defaults included
    assert resolved["model"]["init_args"]["learning_rate"] == 0.01


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"max_step.*run.yaml.*did you mean 'max_steps'"):
        parse("fit", ["--config", _write(tmp_path, "trainer: {max_step: 10}\n"), *MODEL])


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="devices"):
        parse("fit", ["--config", _write(tmp_path, "trainer: {devices: two}\n"), *MODEL])


def test_out_of_range_value_fails_before_any_process(tmp_path):
    config = parse("fit", ["--config", _write(tmp_path, "trainer: {devices: 0}\n"), *MODEL])
    with pytest.raises(ConfigError, match="devices must be a whole number >= 1"):
        instantiate(config)


def test_strategy_option_of_another_strategy(tmp_path):
    with pytest.raises(StrategyError, match=r"option 'sharding_strategy' does not belong to strategy 'ddp'"):
        parse("fit", ["--config", _write(tmp_path, "strategy: {name: ddp, sharding_strategy: FULL_SHARD}\n"), *MODEL])
    with pytest.raises(StrategyError, match=r"did you mean 'cpu_offload'"):
        parse("fit", ["--config", _write(tmp_path, "strategy: {name: fsdp, cpu_ofload: true}\n"), *MODEL])


def test_options_without_a_strategy_name(tmp_path):
    with pytest.raises(StrategyError, match="need a named strategy"):
        parse("fit", ["--config", _write(tmp_path, "strategy: {sharding_strategy: FULL_SHARD}\n"), *MODEL])


def test_unknown_strategy_name(tmp_path):
    with pytest.raises(StrategyError, match="unknown strategy 'zero4'.*fsdp"):
        parse("fit", ["--config", _write(tmp_path, "strategy: {name: zero4}\n"), *MODEL])


def test_model_class_must_be_a_train_module(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        parse("fit", ["--config", _write(tmp_path, "model: {class_path: torch.nn.Linear}\n")])


def test_configuration_reference_is_current():
    from pathlib import Path

    from shardtrain.config_reference import generate

    committed = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert committed == generate(), (
        "docs/configuration.md is stale: run `python -m shardtrain.config_reference > docs/configuration.md`"
    )
