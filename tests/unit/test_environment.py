"""Rank layout read from torchrun's and SLURM's environment variables."""

import pytest

from shardtrain.launch.environment import detect_environment, first_slurm_host


def test_local_run_needs_processes_started_only_when_more_than_one():
    one = detect_environment(1, 1, env={})
    two = detect_environment(2, 1, env={})
    assert (one.source, one.world_size, one.processes_started) == ("local", 1, True)
    assert (two.source, two.world_size, two.processes_started) == ("local", 2, False)


def test_torchrun_layout():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    layout = detect_environment(4, 2, env=env)
    assert (layout.source, layout.global_rank, layout.local_rank, layout.node_rank, layout.world_size) == ("torchrun", 5, 1, 1, 8)
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
    assert (layout.world_size, layout.local_world_size, layout.main_address, layout.main_port) == (4, 2, "gpu007", 16234)


def test_interactive_slurm_shell_is_a_local_run():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash"}
    assert detect_environment(2, 1, env=env).source == "local"


@pytest.mark.parametrize(
    "nodelist, host",
    [("node01", "node01"), ("gpu[003-006,010],cpu01", "gpu003"), ("a[7,9]", "a7"), ("x1,x2", "x1")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host
