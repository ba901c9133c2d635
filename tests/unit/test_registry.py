"""Strategies by name, and third-party strategies found through the entry-point group."""

import subprocess
import sys
import textwrap

import pytest

from shardtrain import DDPStrategy, SingleDeviceStrategy, StrategyError, available_strategies
from shardtrain.strategies import create_strategy, register_strategy


def test_builtin_names():
    assert {"single", "ddp"} <= set(available_strategies())
    assert isinstance(create_strategy("DDP"), DDPStrategy)
    assert isinstance(create_strategy("single"), SingleDeviceStrategy)


def test_options_and_objects():
    strategy = create_strategy("ddp", find_unused_parameters=True)
    assert strategy.ddp_kwargs["find_unused_parameters"] is True
    same = DDPStrategy()
    assert create_strategy(same) is same
    with pytest.raises(StrategyError, match="pass them to its constructor"):
        create_strategy(same, static_graph=True)


def test_alias_defaults():
    register_strategy("ddp_find_unused", DDPStrategy, "test alias", find_unused_parameters=True)
    assert create_strategy("ddp_find_unused").ddp_kwargs["find_unused_parameters"] is True


def test_entry_point_plugin(tmp_path):
    """A package installed with an entry point in `shardtrain.strategies` is selectable by name."""
    (tmp_path / "my_plugin.py").write_text(
        textwrap.dedent(
            """
            from shardtrain.strategies.ddp import DDPStrategy

            class PipelineStrategy(DDPStrategy):
                name = "my_pipeline"
            """
        )
    )
    dist_info = tmp_path / "my_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[shardtrain.strategies]\nmy_pipeline = my_plugin:PipelineStrategy\nddp = my_plugin:PipelineStrategy\n"
    )
    code = textwrap.dedent(
        """
        from shardtrain import Trainer, available_strategies
        from shardtrain.strategies.ddp import DDPStrategy
        trainer = Trainer(accelerator="cpu", strategy="my_pipeline")
        print(type(trainer.strategy).__name__, "my_pipeline" in available_strategies())
        print(type(Trainer(accelerator="cpu", strategy="ddp").strategy).__name__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path), "PATH": ""},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split("\n")[:2]
    assert first == "PipelineStrategy True"
    assert second == "DDPStrategy", "a plug-in must not take over a built-in name"
