"""Rank layout read from torchrun's and SLURM's environment variables, and from NODE_RANK on several nodes."""

import re

import pytest
import torch

from shardtrain.cli import apply_node_flags
from shardtrain.errors import ConfigError
from shardtrain.launch.environment import detect_environment, first_slurm_host, outside_launcher


def test_local_run_needs_processes_started_only_when_more_than_one():
    one = detect_environment(1, 1, env={})
    two = detect_environment(2, 1, env={})
    assert (one.source, one.world_size, one.processes_started) == ("local", 1, True)
    assert (two.source, two.world_size, two.processes_started) == ("local", 2, False)


def test_torchrun_layout():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
    }
    layout = detect_environment(4, 2, env=env)
    assert (layout.source, layout.global_rank, layout.local_rank, layout.node_rank, layout.world_size) == (
        "torchrun",
        5,
        1,
        1,
        8,
    )
    assert (layout.main_address, layout.main_port, layout.processes_started) == ("node0", 29500, True)


def test_slurm_layout():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NAME": "train",
    }
    layout = detect_environment(2, 2, env=env)
    assert (layout.source, layout.global_rank, layout.local_rank, layout.node_rank) == ("slurm", 3, 1, 1)
    assert (layout.world_size, layout.local_world_size, layout.main_address, layout.main_port) == (
        4,
        2,
        "gpu007",
        16234,
    )


def test_interactive_slurm_shell_is_a_local_run():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash"}
    assert detect_environment(2, 1, env=env).source == "local"


@pytest.mark.parametrize(
    "nodelist, host",
    [("node01", "node01"), ("gpu[003-006,010],cpu01", "gpu003"), ("a[7,9]", "a7"), ("x1,x2", "x1")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


# ---------------------------------------------------------------- several nodes

NODE_1 = {"NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_local_node_rank_places_the_node_in_the_global_ranks():
    layout = detect_environment(2, 2, env=NODE_1)
    assert (layout.source, layout.global_rank, layout.local_rank, layout.node_rank) == ("local", 2, 0, 1)
    assert (layout.world_size, layout.local_world_size, layout.num_nodes, layout.processes_started) == (4, 2, 2, False)
    assert (layout.main_address, layout.main_port) == ("node0", 29500)


def test_ranks_started_by_the_launcher_on_node_1():
    # What SubprocessLauncher sets for local rank 1 of node 1 (2 devices x 2 nodes); Engine.launch re-reads it.
    env = {
        **NODE_1,
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "SHARDTRAIN_LAUNCHER": "local",
    }
    layout = detect_environment(2, 1, env=env)
    assert (
        layout.source,
        layout.global_rank,
        layout.local_rank,
        layout.node_rank,
        layout.world_size,
        layout.num_nodes,
    ) == ("local", 3, 1, 1, 4, 2)
    assert outside_launcher(env) is None


def test_torchrun_multinode_node_rank_from_group_rank_or_rank():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
    }
    layout = detect_environment(1, 2, env=env)
    assert (layout.source, layout.global_rank, layout.node_rank, layout.num_nodes) == ("torchrun", 1, 1, 2)
    assert layout.describe() == "node 1 of 2 (torchrun): ranks 1-1 of 2, main node0:29500"
    without_group_rank = {key: value for key, value in env.items() if key != "GROUP_RANK"}
    assert detect_environment(1, 2, env=without_group_rank).node_rank == 1
    assert outside_launcher(env) == "torchrun"


def test_one_node_needs_no_main_port():
    layout = detect_environment(2, 1, env={"NODE_RANK": "0"})
    assert (layout.global_rank, layout.node_rank, layout.main_port, layout.main_address) == (0, 0, 0, "127.0.0.1")


@pytest.mark.parametrize(
    "devices, num_nodes, env, fix",
    [
        (1, 2, {"NODE_RANK": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}, "number the nodes 0 to 1"),
        (1, 2, {"NODE_RANK": "-1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}, "number the nodes 0 to 1"),
        (2, 1, {"NODE_RANK": "1"}, "or raise num_nodes (--num-nodes)"),
        (
            1,
            2,
            {"NODE_RANK": "one", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
            "set NODE_RANK (or --node-rank) to one",
        ),
        (2, 2, {"NODE_RANK": "0", "MASTER_ADDR": "node0"}, "pass --main-port PORT (or set MASTER_PORT)"),
        (
            2,
            2,
            {"NODE_RANK": "0", "MASTER_ADDR": "node0", "MASTER_PORT": "0"},
            "pass --main-port PORT (or set MASTER_PORT)",
        ),
        (2, 2, {"NODE_RANK": "0", "MASTER_ADDR": "node0", "MASTER_PORT": "70000"}, "choose one from 1024 to 65535"),
        (2, 2, {"NODE_RANK": "1", "MASTER_PORT": "29500"}, "pass --main-address HOST (or set MASTER_ADDR)"),
    ],
)
def test_bad_multinode_layout_is_a_config_error_naming_the_fix(devices, num_nodes, env, fix):
    with pytest.raises(ConfigError, match=re.escape(fix)):
        detect_environment(devices, num_nodes, env=env)


def test_slurm_is_an_outside_launcher():
    assert outside_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}) == "slurm"
    assert outside_launcher({}) is None


# ---------------------------------------------------------------- shardtrain fit --num-nodes/--node-rank/--main-address/--main-port


def test_node_flags_set_the_environment_and_trainer_num_nodes():
    environ: dict[str, str] = {}
    argv = [
        "--config",
        "run.yaml",
        "--num-nodes",
        "2",
        "--node-rank=1",
        "--trainer.devices",
        "2",
        "--main-address",
        "node0",
        "--main-port",
        "29500",
    ]
    rest = apply_node_flags(argv, environ)
    assert rest == ["--config", "run.yaml", "--trainer.devices", "2", "--trainer.num_nodes", "2"]
    assert environ == NODE_1
    assert apply_node_flags(["--trainer.max_steps", "-1"], environ) == ["--trainer.max_steps", "-1"]


def test_node_flags_are_refused_under_torchrun_but_not_in_ranks_shardtrain_started():
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    with pytest.raises(ConfigError, match="started by torchrun.*drop --node-rank --main-port"):
        apply_node_flags(["--node-rank", "1", "--main-port", "29500"], dict(torchrun))
    assert apply_node_flags(["--num-nodes", "2"], dict(torchrun)) == ["--trainer.num_nodes", "2"]
    child = {**torchrun, "SHARDTRAIN_LAUNCHER": "local"}
    apply_node_flags(["--node-rank", "0", "--main-port", "29500"], child)
    assert (child["NODE_RANK"], child["MASTER_PORT"]) == ("0", "29500")


def test_node_flag_that_is_not_a_number():
    with pytest.raises(ConfigError, match="--main-port: invalid int value: 'http'"):
        apply_node_flags(["--main-port", "http"], {})


TORCHRUN_2X2 = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}
SLURM_2X2 = {
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NAME": "train",
}


@pytest.mark.parametrize(
    "env, devices, num_nodes, message",
    [
        (TORCHRUN_2X2, 4, 2, "devices=4 but torchrun started 2 processes per node: set devices=2 (or devices='auto'"),
        (TORCHRUN_2X2, 4, 2, "or start torchrun with --nproc-per-node 4"),
        (TORCHRUN_2X2, 2, 1, "num_nodes=1 but torchrun started 2 nodes (4 processes, 2 per node): set num_nodes=2"),
        (TORCHRUN_2X2, None, 1, "or start torchrun with --nnodes 1"),
        (SLURM_2X2, 1, 2, "devices=1 but slurm started 2 processes per node"),
        (SLURM_2X2, 1, 2, "--ntasks-per-node 1"),
        (SLURM_2X2, 2, 4, "num_nodes=4 but slurm started 2 nodes"),
    ],
)
def test_devices_and_num_nodes_that_disagree_with_the_launcher_are_refused(env, devices, num_nodes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        detect_environment(devices, num_nodes, env=env)


@pytest.mark.parametrize("env", [TORCHRUN_2X2, SLURM_2X2])
def test_auto_devices_take_the_launchers_layout(env):
    assert detect_environment(None, 2, env=env).local_world_size == 2
    assert detect_environment(2, 2, env=env).world_size == 4


def test_auto_devices_without_a_launcher_start_one_process_per_visible_device():
    assert detect_environment(None, 1, env={}, auto_devices=1).world_size == 1
    assert detect_environment(None, 2, env={"MASTER_ADDR": "n0", "MASTER_PORT": "2"}, auto_devices=4).world_size == 8


def test_the_engine_refuses_a_mismatch_before_any_process_group(monkeypatch):
    from shardtrain import Engine

    for key, value in TORCHRUN_2X2.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="devices=1 but torchrun started 2 processes per node"):
        Engine(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp")
    engine = Engine(accelerator="cpu", num_nodes=2, strategy="ddp")  # devices="auto"
    assert (engine.world_size, engine.global_rank) == (4, 3)
    assert not torch.distributed.is_initialized()
