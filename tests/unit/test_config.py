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


def test_callbacks_by_short_name_with_options_and_overrides(tmp_path):
    path = _write(
        tmp_path,
        """\
        trainer:
          accelerator: cpu
          callbacks:
            - class_path: ThroughputMonitor
              init_args: {prog_bar: false}
            - class_path: shardtrain.ModelCheckpoint
              init_args: {every_n_train_steps: 100}
        """,
    )
    config = parse(
        "fit",
        [
            "--config",
            path,
            *MODEL,
            "--trainer.callbacks+",
            "examples.gpt.sample.SampleText",
            "--trainer.callbacks.length",
            "7",
        ],
    )
    trainer, _, _ = instantiate(config)
    from examples.gpt.sample import SampleText
    from shardtrain import ModelCheckpoint, RunSummary, ThroughputMonitor

    kinds = {type(cb): cb for cb in trainer.callbacks}
    assert kinds[ThroughputMonitor].prog_bar is False
    assert kinds[ModelCheckpoint].every_n_train_steps == 100
    assert kinds[SampleText].length == 7
    assert RunSummary in kinds  # enable_model_summary defaults to True
    shown = yaml.safe_load(dump(config))["trainer"]["callbacks"]
    assert [entry["class_path"].rsplit(".", 1)[-1] for entry in shown] == [
        "ThroughputMonitor",
        "ModelCheckpoint",
        "SampleText",
    ]
    assert shown[1]["init_args"]["every_n_train_steps"] == 100


def test_logger_true_false_or_classes_defaulting_to_the_root_dir(tmp_path):
    from shardtrain import CSVLogger

    def loggers(*argv):
        config = parse("fit", ["--trainer.accelerator", "cpu", *MODEL, *argv])
        return instantiate(config)[0].loggers, yaml.safe_load(dump(config))["trainer"]["logger"]

    built, shown = loggers("--trainer.logger", "false")
    assert built == [] and shown is False
    built, shown = loggers("--trainer.default_root_dir", str(tmp_path / "a"))
    assert [type(x) for x in built] == [CSVLogger] and built[0].path == tmp_path / "a" / "metrics.csv" and shown is True
    built, shown = loggers(
        "--trainer.default_root_dir",
        str(tmp_path / "b"),
        "--trainer.logger",
        f"[{{class_path: CSVLogger}}, {{class_path: CSVLogger, init_args: {{save_dir: {tmp_path / 'own'}, name: x}}}}]",
    )
    assert [x.save_dir for x in built] == [str(tmp_path / "b"), str(tmp_path / "own")]  # left out: the Trainer's
    assert [x.log_dir for x in built] == [
        str(tmp_path / "b" / "lightning_logs" / "version_0"),
        str(tmp_path / "own" / "x" / "version_0"),
    ]
    assert [entry["init_args"]["save_dir"] for entry in shown] == [str(tmp_path / "b"), str(tmp_path / "own")]


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            "{class_path: ThroughputMonitr}",
            r"no Callback class 'ThroughputMonitr'; did you mean 'ThroughputMonitor'\?.*run.yaml",
        ),
        (
            "{class_path: torch.nn.Linear}",
            r"torch.nn.Linear is not a shardtrain Callback; use shardtrain's by name \(.*ModelCheckpoint",
        ),
        (
            "{class_path: ModelCheckpoint, init_args: {every_n_train_step: 5}}",
            r"has no option 'every_n_train_step'; did you mean 'every_n_train_steps'\?",
        ),
    ],
)
def test_wrong_callback_names_the_fix(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        parse("fit", ["--config", _write(tmp_path, f"trainer: {{callbacks: [{entry}]}}\n"), *MODEL])


def test_wrong_logger_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"no Logger class 'TensorBoard'; did you mean 'TensorBoardLogger'\?"):
        parse("fit", ["--trainer.logger", "[{class_path: TensorBoard}]", *MODEL])


def test_the_gpt_example_config_shows_throughput_checkpoints_and_a_sample():
    from pathlib import Path

    from examples.gpt.sample import SampleText
    from shardtrain import ModelCheckpoint, ThroughputMonitor

    gpt = Path(__file__).resolve().parents[2] / "examples" / "gpt" / "gpt.yaml"
    trainer, _, _ = instantiate(parse("fit", ["--config", str(gpt), "--trainer.accelerator", "cpu"]))
    kinds = {type(cb): cb for cb in trainer.callbacks}
    assert ThroughputMonitor in kinds and kinds[ModelCheckpoint].every_n_train_steps == 100
    assert kinds[SampleText].length == 200


def test_run_summary_counts_every_parameter_once():
    import torch

    from shardtrain.callbacks.summary import count_parameters

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: counted once
    model.add_module("frozen", torch.nn.Linear(2, 2))
    model.frozen.requires_grad_(False)
    assert count_parameters(model) == (40 + 6, 40)
    partitioned = torch.nn.Module()
    partitioned.weight = torch.nn.Parameter(torch.empty(0))  # DeepSpeed ZeRO-3's placeholder
    partitioned.weight.ds_numel = 1000
    assert count_parameters(partitioned) == (1000, 1000)


def test_enable_model_summary_false_adds_no_summary():
    from shardtrain import RunSummary, Trainer

    assert any(isinstance(cb, RunSummary) for cb in Trainer(accelerator="cpu", logger=False).callbacks)
    assert not any(
        isinstance(cb, RunSummary)
        for cb in Trainer(accelerator="cpu", logger=False, enable_model_summary=False).callbacks
    )


def test_strategy_names_in_a_config_are_case_insensitive_like_the_trainers():
    from shardtrain.config import check_strategy

    check_strategy({"name": "DDP"})
    check_strategy({"name": "FSDP", "cpu_offload": True})
