"""FSDP2 over real processes: every sharding mode matches one process, memory falls as promised."""

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def single(reference_run):
    """One process, global batch 16: the reference curve (run once a session, shared)."""
    return reference_run("train_gpt.py", "--devices", "1", "--batch-size", "16")


@pytest.mark.parametrize(
    "options",
    [
        pytest.param('{"sharding_strategy": "FULL_SHARD"}', marks=pytest.mark.fast),
        '{"sharding_strategy": "SHARD_GRAD_OP"}',
        '{"sharding_strategy": "NO_SHARD"}',
        '{"cpu_offload": true}',
        '{"activation_checkpointing_policy": ["Block"]}',
        '{"auto_wrap_policy": ["Block", "MLP"]}',
        '{"compile": true}',  # Inductor builds C++ kernels on the CPU: about 20 s
    ],
)
def test_fsdp_matches_single_process(single, tmp_path, options):
    run = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path,
            "--devices",
            "2",
            "--strategy",
            "fsdp",
            "--strategy-options",
            options,
            "--batch-size",
            "8",
        )
    )
    result = run.result()
    assert result["world_size"] == 2
    assert result["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert result["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-5)


@pytest.mark.fast
def test_hybrid_shard_on_a_2x2_mesh(single, tmp_path):
    options = '{"sharding_strategy": "HYBRID_SHARD", "device_mesh": [2, 2]}'
    result = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path,
            "--devices",
            "4",
            "--strategy",
            "fsdp",
            "--strategy-options",
            options,
            "--batch-size",
            "4",
        )
    ).result()
    assert result["mesh"] == [2, 2]
    assert result["losses"] == pytest.approx(single["losses"], abs=1e-5)


def test_accumulation_without_sync_matches(single, tmp_path):
    result = assert_ok(
        run_script(
            "train_gpt.py", tmp_path, "--devices", "2", "--strategy", "fsdp", "--batch-size", "4", "--accumulate", "2"
        )
    ).result()
    assert result["losses"] == pytest.approx(single["losses"], abs=1e-5)


def test_clipping_uses_the_norm_of_the_full_gradient(tmp_path):
    one = assert_ok(
        run_script("train_gpt.py", tmp_path / "one", "--devices", "1", "--batch-size", "16", "--clip", "0.5")
    ).result()
    two = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path / "two",
            "--devices",
            "2",
            "--strategy",
            "fsdp",
            "--batch-size",
            "8",
            "--clip",
            "0.5",
        )
    ).result()
    assert min(one["grad_norm_logged"]) > 0.5
    assert two["grad_norm_logged"] == pytest.approx(one["grad_norm_logged"], rel=1e-5)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)


def test_bf16_mixed_tracks_fp32(single, tmp_path):
    result = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path,
            "--devices",
            "2",
            "--strategy",
            "fsdp",
            "--batch-size",
            "8",
            "--precision",
            "bf16-mixed",
        )
    ).result()
    assert result["losses"] == pytest.approx(single["losses"], abs=2e-2)
    assert result["losses"] != pytest.approx(single["losses"], abs=1e-5), "bf16 compute should not be bit-exact"


def _ranks(run, n):
    return [run.result(f"rank{r}.json") for r in range(n)]


def test_meta_init_never_holds_the_full_model(tmp_path):
    # glibc keeps freed buffers below its (rising) mmap threshold, which would make RSS count
    # transient tensors long after they are gone; a fixed threshold makes RSS track live memory.
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    ranks = _ranks(assert_ok(run_script("fsdp_memory.py", tmp_path, "--what", "init", env=env)), 2)
    for rank in ranks:
        assert rank["local_param_bytes"] == pytest.approx(rank["full_model_bytes"] / 2, rel=0.01)
        # Its shard plus one unit's full tensors while that unit is initialised; never the whole model.
        assert rank["rss_growth"] < rank["local_param_bytes"] + 2 * rank["largest_unit_bytes"], rank
        assert rank["rss_growth"] < 0.8 * rank["full_model_bytes"], rank


def test_model_states_fall_with_more_ranks(tmp_path):
    one = _ranks(assert_ok(run_script("fsdp_memory.py", tmp_path / "one", "--what", "states", "--devices", "1")), 1)[0]
    two = _ranks(assert_ok(run_script("fsdp_memory.py", tmp_path / "two", "--what", "states", "--devices", "2")), 2)
    for key in ("params", "grads", "optimizer"):
        for rank in two:
            assert rank[key] == pytest.approx(one[key] / 2, rel=0.02), key


def test_activation_checkpointing_saves_memory_and_changes_nothing_else(tmp_path):
    plain = _ranks(assert_ok(run_script("fsdp_memory.py", tmp_path / "plain", "--what", "activations")), 2)[0]
    checkpointed = _ranks(
        assert_ok(run_script("fsdp_memory.py", tmp_path / "ac", "--what", "activations", "--checkpointing")), 2
    )[0]
    assert checkpointed["saved_bytes"] < 0.35 * plain["saved_bytes"], (
        checkpointed["saved_bytes"],
        plain["saved_bytes"],
    )
    assert checkpointed["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)


def test_clipping_by_value_matches(tmp_path):
    one = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path / "one",
            "--devices",
            "1",
            "--batch-size",
            "16",
            "--clip",
            "0.01",
            "--clip-algorithm",
            "value",
        )
    ).result()
    two = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path / "two",
            "--devices",
            "2",
            "--strategy",
            "fsdp",
            "--batch-size",
            "8",
            "--clip",
            "0.01",
            "--clip-algorithm",
            "value",
        )
    ).result()
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)


def test_bf16_true_trains_in_bf16(single, tmp_path):
    result = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path,
            "--devices",
            "2",
            "--strategy",
            "fsdp",
            "--batch-size",
            "8",
            "--precision",
            "bf16-true",
        )
    ).result()
    assert result["losses"] == pytest.approx(single["losses"], abs=5e-2)
    assert result["losses"][-1] < result["losses"][0] - 1.0
