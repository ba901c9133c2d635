"""Inject each fault into a real 2-process run and time how long detection and recovery take.

    python benchmarks/faults.py [--repeats 3] [--json results/faults.json] [--only hang_timeout checkpoint]

Every scenario runs the test scripts (tests/distributed/scripts) as real processes on gloo and
reads the time the fault was injected from the file the script writes at that moment:

* detection = from the fault to the exit of the whole run (every rank stopped), or for a
  preemption from the signal to the exit after the checkpoint;
* recovery = from the fault to the first training step of the restarted attempt (torchrun).

The figures are dominated by process start-up and imports on a 2-core CPU machine; they are an
upper bound for the library's own share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "distributed" / "scripts"
sys.path.insert(0, str(ROOT / "src"))

from shardtrain.launch.environment import find_free_port  # noqa: E402

GPT = ["--strategy", "fsdp", "--max-steps", "12"]


def _run(script: str, out: Path, args: list[str], torchrun_args: list[str] | None = None) -> tuple[int, float, str]:
    command = [sys.executable, str(SCRIPTS / script), "--out", str(out), *args]
    if torchrun_args is not None:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={find_free_port()}",
            *torchrun_args,
            *command[1:],
        ]
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return completed.returncode, time.time(), completed.stdout + completed.stderr


def _time_of(path: Path) -> float:
    return json.loads(path.read_text())["time"]


def scenarios() -> dict[str, callable]:
    def preempt_rank0(out: Path) -> dict:
        code, ended, _ = _run(
            "train_gpt.py",
            out,
            [
                "--devices",
                "2",
                *GPT,
                "--log-every",
                "4",
                "--signal-at-step",
                "5",
                "--send-signal",
                "SIGTERM",
                "--signal-rank",
                "0",
            ],
        )
        return {
            "exit_code": code,
            "detection_s": ended - _time_of(out / "signal_sent.json"),
            "stopped_after_step": (out / "checkpoints" / "last").read_text(),
        }

    def preempt_rank1_every_step(out: Path) -> dict:
        options = json.dumps({"signals": ["SIGUSR1"], "check_every_n_steps": 1})
        code, ended, _ = _run(
            "train_gpt.py",
            out,
            [
                "--devices",
                "2",
                *GPT,
                "--preemption",
                options,
                "--signal-at-step",
                "5",
                "--send-signal",
                "SIGUSR1",
                "--signal-rank",
                "1",
            ],
        )
        return {
            "exit_code": code,
            "detection_s": ended - _time_of(out / "signal_sent.json"),
            "stopped_after_step": (out / "checkpoints" / "last").read_text(),
        }

    def sigkill_under_torchrun_restart(out: Path) -> dict:
        code, ended, _ = _run(
            "train_gpt.py",
            out,
            [
                "--devices",
                "2",
                *GPT,
                "--checkpoint-every",
                "3",
                "--ckpt-path",
                "last",
                "--signal-at-step",
                "7",
                "--send-signal",
                "SIGKILL",
                "--signal-rank",
                "1",
            ],
            ["--max-restarts=1"],
        )
        killed = _time_of(out / "signal_sent.json")
        restarted = json.loads((out / "train_start_attempt1.json").read_text())
        return {
            "exit_code": code,
            "recovery_s": restarted["time"] - killed,
            "resumed_at_step": restarted["step"],
            "finish_after_kill_s": ended - killed,
        }

    def failure(how: str) -> callable:
        def run(out: Path) -> dict:
            code, ended, output = _run("fail_rank.py", out, ["--fail-rank", "1", "--how", how])
            return {
                "exit_code": code,
                "detection_s": ended - _time_of(out / "fault_injected.json"),
                "launcher_names_rank_1": "rank 1 failed" in output,
                "rank_0_error_has_its_traceback": "RankFailedError: rank 1 failed first" in output,
            }

        return run

    def nan_stop(out: Path) -> dict:
        code, ended, output = _run(
            "fail_rank.py", out, ["--fail-rank", "1", "--how", "nan", "--on-nonfinite", "stop", "--max-steps", "8"]
        )
        return {
            "exit_code": code,
            "detection_s": ended - _time_of(out / "fault_injected.json"),
            "reported": "NonFiniteError: step 4" in output,
        }

    def mismatched_models(out: Path) -> dict:
        started = time.time()
        code, ended, output = _run(
            "train_gpt.py", out, ["--devices", "2", "--strategy", "fsdp", "--d-model-on-rank-1", "96"]
        )
        return {"exit_code": code, "whole_run_s": ended - started, "reported": "differs between ranks" in output}

    def hang(where: str, hang_timeout: int = 8, timeout: int = 60) -> callable:
        def run(out: Path) -> dict:
            arguments = ["--strategy", "ddp", "--where", where, "--hang-timeout", str(hang_timeout)]
            code, ended, output = _run("hang.py", out, [*arguments, "--timeout", str(timeout)])
            named = "the others wait for rank 1" in output or "wait in different PyTorch calls" in output
            return {
                "exit_code": code,
                "detection_s": ended - _time_of(out / "fault_injected.json"),
                "report_names_the_place": named,
            }

        return run

    def damaged_checkpoint(out: Path) -> dict:
        _run("train_gpt.py", out, ["--devices", "2", "--strategy", "fsdp", "--checkpoint-every", "5"])
        shard = out / "checkpoints" / "step=10" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
        started = time.time()
        code, ended, output = _run("train_gpt.py", out, ["--devices", "2", "--strategy", "fsdp", "--ckpt-path", "last"])
        return {"exit_code": code, "whole_resumed_run_s": ended - started, "fell_back": "resuming from" in output}

    return {
        "rank 1 sleeps in training_step, hang_timeout_seconds=8": hang("sleep"),
        "rank 1 stuck reading data, hang_timeout_seconds=8": hang("data"),
        "rank 0 calls a collective rank 1 skips, hang_timeout_seconds=8": hang("collective"),
        "rank 1 sleeps, collective timeout 15 s (no hang timeout before it)": hang("sleep", 600, 15),
        "a flipped bit in the last checkpoint, ckpt_path='last'": damaged_checkpoint,
        "SIGTERM to rank 0 (agree at logging step, every 4)": preempt_rank0,
        "SIGUSR1 to rank 1 only (check every step)": preempt_rank1_every_step,
        "SIGKILL rank 1, torchrun --max-restarts=1": sigkill_under_torchrun_restart,
        "exception on rank 1": failure("raise"),
        "SIGKILL rank 1, our launcher": failure("kill"),
        "rank 1 dies while rank 0 is stuck outside collectives": failure("hang-others"),
        "NaN loss on rank 1, on_nonfinite='stop'": nan_stop,
        "rank 1 builds another model": mismatched_models,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--only", nargs="+", default=None, help="run the scenarios whose names contain one of these")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    chosen = {
        name: scenario
        for name, scenario in scenarios().items()
        if args.only is None or any(part in name for part in args.only)
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, scenario in chosen.items():
            results[name] = [scenario(Path(tmp) / f"{len(results)}_{repeat}") for repeat in range(args.repeats)]
            runs = results[name]
            timed = {key for key in runs[0] if key.endswith("_s")}
            summary = ", ".join(
                f"{key} median {statistics.median(r[key] for r in runs):.1f} (max {max(r[key] for r in runs):.1f})"
                for key in sorted(timed)
            )
            others = {key: sorted({str(r[key]) for r in runs}) for key in runs[0] if key not in timed}
            print(f"{name}: {summary}; {others}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
