"""The DeepSpeed engine is destroyed when fit() ends (its ZeRO hooks removed), while the trained
weights and optimizer state stay readable and saveable, and validate/test/predict on the same Trainer
evaluate the trained model (as Lightning's do): one process, DeepSpeed's CPU accelerator."""

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed
pytest.importorskip("deepspeed", reason="install the extra: pip install 'shardtrain[deepspeed]'")


@pytest.mark.parametrize("stage", [2, 3])
def test_fit_destroys_the_engine_keeps_the_state_readable_and_evaluates_after(tmp_path, stage):
    result = assert_ok(run_script("deepspeed_teardown.py", tmp_path, "--stage", str(stage), timeout=300)).result()
    assert result["destroyed"] is True
    # every parameter had ZeRO's gradient hook during fit, none after; ZeRO-3's gather-on-forward hooks are gone too
    assert (result["grad_hooks_before"], result["grad_hooks_after"]) == (4, 0)
    if stage == 3:
        assert result["hooks_before"] > 0
    assert result["hooks_after"] == 0
    # read after teardown, the state is the state at the end of training, value for value
    assert set(result["weights_after"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert result["weights_after"] == result["weights_before"]
    assert len(result["exp_avg_after"]) == 4
    assert result["exp_avg_after"] == result["exp_avg_before"]
    assert any(abs(v) > 0 for values in result["exp_avg_after"].values() for v in values)
    assert result["saved"] is True
    assert "use a new Trainer" in result["refused"]
    # validate, test (on the checkpoint just saved) and predict after fit give plain torch's figures on the weights
    assert result["validated"] == pytest.approx(result["expected_mse"], rel=1e-5)
    assert result["tested"] == pytest.approx(result["expected_mse"], rel=1e-5)
    assert result["predicted"] == pytest.approx(result["expected_predictions"], abs=1e-6)
    assert result["exp_avg_after_evaluation"] == result["exp_avg_after"]  # the optimizer state survives them
