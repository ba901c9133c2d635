"""Strategies by name, and third-party strategies found through the entry-point group."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import shardtrain
from shardtrain import DDPStrategy, SingleDeviceStrategy, StrategyError, available_strategies
from shardtrain.strategies import create_strategy, register_strategy
from shardtrain.strategies import registry
from shardtrain.strategies.registry import strategy_defaults, strategy_description, strategy_factory


@pytest.fixture
def restore_registry():
    """Names a test registers are removed after it, so no test sees another's registrations."""
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


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


def test_alias_defaults(restore_registry):
    register_strategy("ddp_find_unused", DDPStrategy, "test alias", find_unused_parameters=True)
    assert create_strategy("ddp_find_unused").ddp_kwargs["find_unused_parameters"] is True


def test_a_mixed_case_name_is_selectable_in_any_case(restore_registry):
    register_strategy("MyPipeline", DDPStrategy, "test plug-in", find_unused_parameters=True)
    assert "mypipeline" in available_strategies()
    for spelling in ("MyPipeline", "mypipeline", "MYPIPELINE"):
        assert create_strategy(spelling).ddp_kwargs["find_unused_parameters"] is True
        assert strategy_factory(spelling) is DDPStrategy
        assert strategy_defaults(spelling) == {"find_unused_parameters": True}
        assert strategy_description(spelling) == "test plug-in"


def test_a_taken_name_is_refused_unless_overridden(restore_registry):
    with pytest.raises(StrategyError, match=r"'ddp' is already registered \(DDPStrategy\).*override=True"):
        register_strategy("DDP", SingleDeviceStrategy)
    assert isinstance(create_strategy("ddp"), DDPStrategy), "a refused registration must change nothing"
    register_strategy("mine", DDPStrategy)
    with pytest.raises(StrategyError, match="already registered"):
        register_strategy("Mine", SingleDeviceStrategy)
    register_strategy("ddp", SingleDeviceStrategy, "deliberate", override=True)
    assert isinstance(create_strategy("ddp"), SingleDeviceStrategy)
    assert strategy_description("DDP") == "deliberate"


def test_unknown_names_list_the_choices():
    with pytest.raises(StrategyError, match="unknown strategy 'dpp'; choose one of: .*ddp"):
        strategy_factory("dpp")
    with pytest.raises(StrategyError, match="non-empty string"):
        register_strategy("  ", DDPStrategy)


def test_entry_point_plugin(tmp_path):
    """A package installed with an entry point in `shardtrain.strategies` is selectable by name."""
    (tmp_path / "my_plugin.py").write_text(
        textwrap.dedent(
            """
            from shardtrain.strategies.ddp import DDPStrategy

            class PipelineStrategy(DDPStrategy):
                name = "my_pipeline"
                auto_priority = 50  # a candidate of strategy="auto", tried first (DDP's memory formula)
            """
        )
    )
    dist_info = tmp_path / "my_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[shardtrain.strategies]\nMy_Pipeline = my_plugin:PipelineStrategy\nDDP = my_plugin:PipelineStrategy\n"
    )
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("always")
        from shardtrain import Trainer, available_strategies
        from shardtrain.strategies.ddp import DDPStrategy
        trainer = Trainer(accelerator="cpu", strategy="My_Pipeline")
        print(type(trainer.strategy).__name__, "my_pipeline" in available_strategies())
        print(type(Trainer(accelerator="cpu", strategy="ddp").strategy).__name__)
        from shardtrain.strategies.registry import auto_candidates
        print(auto_candidates())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(shardtrain.__file__).parents[1])]), "PATH": ""},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    first, second, candidates = result.stdout.split("\n")[:3]
    assert first == "PipelineStrategy True"
    assert second == "DDPStrategy", "a plug-in must not take over a built-in name"
    assert candidates == str(["my_pipeline", "single", "ddp", "fsdp", "model_parallel", "fsdp_cpu_offload"])
    assert "strategy plug-in 'DDP' from my_plugin:PipelineStrategy is ignored" in result.stderr


def test_auto_candidates_are_the_registrations_with_a_priority(restore_registry):
    from shardtrain import Strategy
    from shardtrain.strategies.registry import auto_candidates

    assert auto_candidates() == ["single", "ddp", "fsdp", "model_parallel", "fsdp_cpu_offload"]
    register_strategy("zz_first", DDPStrategy, auto_priority=0)
    register_strategy("aa_tied", DDPStrategy, auto_priority=200)  # ties go by name
    register_strategy("not_a_candidate", DDPStrategy)
    assert auto_candidates() == ["zz_first", "single", "ddp", "aa_tied", "fsdp", "model_parallel", "fsdp_cpu_offload"]
    with pytest.raises(StrategyError, match="'zz_first' is already registered"):
        register_strategy("ZZ_first", DDPStrategy, auto_priority=1)  # a second registration is refused, priority or not

    class NoFormula(SingleDeviceStrategy):
        estimate_memory = Strategy.estimate_memory

    with pytest.raises(StrategyError, match="'no_formula' .*cannot be a candidate.*no memory formula.*estimate_memory"):
        register_strategy("no_formula", NoFormula, auto_priority=10)
    with pytest.raises(StrategyError, match="auto_priority of strategy 'early' must be an integer"):
        register_strategy("early", DDPStrategy, auto_priority=True)
    assert "no_formula" not in available_strategies() and "early" not in available_strategies()
    register_strategy("no_formula", NoFormula)  # selectable by name, just not by auto
    assert "no_formula" not in auto_candidates()
