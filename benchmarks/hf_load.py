"""Start of fine-tuning a pretrained Hugging Face Llama under FSDP: load time and peak memory per rank.

    python benchmarks/hf_load.py --layers 2 --out /tmp/hfbench/hf_load_2l.json   # a quick check
    python benchmarks/hf_load.py --out /tmp/hfbench/hf_load_1b.json              # 1.03B parameters

The model: a Llama of TinyLlama's shape (d 2048, MLP 5632, 16 heads, 4 key-value heads, vocabulary
32000, untied output layer; 20 layers: 1,032,931,328 parameters) with random weights, made here
(built on the meta device, filled in place) and saved with ``save_pretrained`` in bf16 over 1 GB
files with an index, as hub checkpoints are. It is made once in ``--model-dir`` and reused.

Two ways, each in its own fresh processes (2 ranks, gloo, CPU, fp32 training), one after the other:

* ``shardtrain``: a ``TrainModule`` whose ``configure_model()`` does
  ``self.model = shardtrain.hf.from_pretrained(path)``, set up by ``Engine(accelerator="cpu",
  devices=2, strategy="fsdp")``: built on the meta device, sharded, each rank reading its slices.
* ``reference``: what users write today: every rank calls
  ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)``, then ``fully_shard`` on each
  decoder layer and the root (plain ``torch.distributed``, processes started as torchrun does).

Per rank: seconds from the start of the rank's function (process group up, transformers imported)
to the FSDP model being ready; peak RSS at that point (``ru_maxrss``, which counts the pages of
memory-mapped checkpoint files a rank touched); RSS just after (psutil, and its anonymous and
file-backed parts from ``/proc/self/status``). Both ways read from a warm page cache (the files are
read through once before each), so the disk's speed is not in the figures. Correctness: each rank
then computes the loss of one fixed batch under its FSDP model (``torch.no_grad``); both ways must
agree.

Measured 2026-12-02 on 2 cores, two runs (``benchmarks/results/hf_load/``), 1.03B parameters:
(a) 2.1-6.4 s and 2.8 GiB peak per rank, (b) 6.9-7.9 s and 6.1 GiB (peak 0.45x); the same loss to
every printed digit. Before modules whose tensors all come from the checkpoint were left
uninitialised (ccc3739), (a) took 26 s: materialise all-gathered each FSDP unit whole to run
initialisers whose values the checkpoint then overwrote; reading the checkpoint itself takes
under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("shardtrain", "reference")
GIB = 2**30
DEFAULT_LAYERS = 20  # 1,032,931,328 parameters
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, **SHAPE)


def fixed_batch() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------- the checkpoint
def make_checkpoint(directory: Path, layers: int) -> None:
    """Random weights (std 0.02, norms 1), bf16, saved over 1 GB files; written aside, then renamed."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(llama_config(layers), dtype=torch.bfloat16)
    model.to_empty(device="cpu")  # non-persistent buffers (rotary frequencies) are not saved
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="1GB")
    partial.rename(directory)


def ensure_checkpoint(directory: Path, layers: int) -> int:
    """Make the checkpoint unless ``directory`` holds it already; returns its parameter count."""
    if not (directory / "config.json").is_file():
        if directory.exists():
            sys.exit(f"{directory} exists but holds no config.json: remove it or pass another --model-dir")
        directory.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        run_child(["--role", "make"], directory, layers, log=directory.parent / f"{directory.name}.make.log")
        print(f"made {directory} in {time.perf_counter() - started:.0f} s")
    stored = json.loads((directory / "config.json").read_text())
    wanted = llama_config(layers).to_dict()
    differing = [k for k in ("num_hidden_layers", *SHAPE) if stored.get(k) != wanted.get(k)]
    if differing:
        sys.exit(
            f"{directory} holds another model ({', '.join(f'{k}={stored.get(k)}' for k in differing)}); "
            "pass another --model-dir"
        )
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(llama_config(layers))
    return sum(p.numel() for p in model.parameters())


def read_through(directory: Path) -> None:
    """Read every file once, so that both ways start from the same, warm page cache."""
    for path in sorted(directory.iterdir()):
        with open(path, "rb") as handle:
            while handle.read(64 * 2**20):
                pass


# ---------------------------------------------------------------------- in each rank
def memory_figures() -> dict:
    import psutil

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {key: int(status[key].split()[0]) for key in ("RssAnon", "RssFile", "VmHWM") if key in status}
    return {
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "rss_gib": psutil.Process().memory_info().rss / GIB,
        "rss_anon_gib": kib.get("RssAnon", 0) * 1024 / GIB,
        "rss_file_gib": kib.get("RssFile", 0) * 1024 / GIB,
    }


def local_parameter_gib(model: torch.nn.Module) -> float:
    """What this rank holds of the parameters (its shards)."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local) / GIB


def finish_rank(args: argparse.Namespace, rank: int, seconds: float, model, loss_of) -> None:
    """Record the figures at set-up, then the loss of the fixed batch, and write this rank's file."""
    import psutil

    figures = {"seconds": seconds, **memory_figures(), "local_parameters_gib": local_parameter_gib(model)}
    figures["seconds_since_process_start"] = time.time() - psutil.Process().create_time()
    with torch.no_grad():
        figures["loss"] = float(loss_of(fixed_batch()))
    figures["peak_rss_after_loss_gib"] = memory_figures()["peak_rss_gib"]
    Path(args.result_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.result_dir) / f"rank{rank}.json").write_text(json.dumps(figures))


def shardtrain_rank(engine, args: argparse.Namespace) -> None:
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the clock, as in the reference)

    import shardtrain.hf
    from shardtrain import TrainModule

    class PretrainedLlama(TrainModule):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def configure_model(self) -> None:
            self.model = shardtrain.hf.from_pretrained(self.path)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, labels=input_ids).loss

    started = time.perf_counter()
    module = PretrainedLlama(args.model_dir)
    with engine.init_module():
        module.configure_model()
    model = engine.setup(module)
    seconds = time.perf_counter() - started
    finish_rank(args, engine.global_rank, seconds, module, model)
    engine.barrier()
    engine.teardown()


def reference_rank(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    import transformers.models.llama.modeling_llama  # noqa: F401

    dist.init_process_group("gloo")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    seconds = time.perf_counter() - started
    finish_rank(args, dist.get_rank(), seconds, model, lambda batch: model(input_ids=batch, labels=batch).loss)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the run
def child_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_child(extra: list[str], directory: Path, layers: int, log: Path, env_extra: dict | None = None):
    command = [sys.executable, __file__, "--model-dir", str(directory), "--layers", str(layers), *extra]
    with open(log, "w") as handle:
        completed = subprocess.run(command, env={**child_env(), **(env_extra or {})}, stdout=handle, stderr=handle)
    if completed.returncode != 0:
        sys.exit(
            f"{' '.join(command)} failed (exit {completed.returncode}); the end of {log}:\n" + log.read_text()[-6000:]
        )


def run_reference(directory: Path, layers: int, result_dir: Path, log: Path, timeout: float) -> None:
    """Two ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without its agent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        __file__,
        "--model-dir",
        str(directory),
        "--layers",
        str(layers),
        "--role",
        "reference",
        "--result-dir",
        str(result_dir),
    ]
    processes = []
    with open(log, "w") as handle:
        for rank in range(2):
            layout = {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            processes.append(subprocess.Popen(command, env={**child_env(), **layout}, stdout=handle, stderr=handle))
        deadline = time.monotonic() + timeout
        codes = [None, None]
        while None in codes and time.monotonic() < deadline:
            codes = [p.poll() for p in processes]
            if any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        codes = [p.returncode for p in processes]
    if codes != [0, 0]:
        sys.exit(f"reference ranks exited {codes}; the end of {log}:\n" + log.read_text()[-6000:])


def measure_way(way: str, directory: Path, layers: int, work: Path, timeout: float) -> list[dict]:
    result_dir = work / way
    shutil.rmtree(result_dir, ignore_errors=True)
    result_dir.mkdir(parents=True)
    read_through(directory)
    log = work / f"{way}.log"
    started = time.perf_counter()
    if way == "shardtrain":
        run_child(["--role", "shardtrain", "--result-dir", str(result_dir)], directory, layers, log)
    else:
        run_reference(directory, layers, result_dir, log, timeout)
    print(f"{way}: done in {time.perf_counter() - started:.0f} s (log: {log})", flush=True)
    return [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def print_table(results: dict[str, list[dict]], parameters: int, layers: int) -> None:
    a, b = results["shardtrain"], results["reference"]
    print(f"\nLlama, {layers} layers, {parameters:,} parameters, bf16 checkpoint -> fp32, FSDP over 2 CPU ranks (gloo)")
    print("(a) shardtrain: Engine(strategy='fsdp') + shardtrain.hf.from_pretrained in configure_model()")
    print("(b) reference:  AutoModelForCausalLM.from_pretrained(fp32) in every rank, then fully_shard\n")
    header = (
        f"{'rank':>4} | {'(a) s':>7} {'(b) s':>7} {'a/b':>5} | {'(a) peak GiB':>12} {'(b) peak GiB':>12} "
        f"{'a/b':>5} | {'(a) RSS after':>13} {'(b) RSS after':>13} | {'(a) anon/file':>13} {'(b) anon/file':>13}"
    )
    print(header)
    print("-" * len(header))
    for rank, (x, y) in enumerate(zip(a, b)):
        print(
            f"{rank:>4} | {x['seconds']:7.1f} {y['seconds']:7.1f} {x['seconds'] / y['seconds']:5.2f} | "
            f"{x['peak_rss_gib']:12.2f} {y['peak_rss_gib']:12.2f} {x['peak_rss_gib'] / y['peak_rss_gib']:5.2f} | "
            f"{x['rss_gib']:13.2f} {y['rss_gib']:13.2f} | "
            f"{x['rss_anon_gib']:6.2f}/{x['rss_file_gib']:<6.2f} {y['rss_anon_gib']:6.2f}/{y['rss_file_gib']:<6.2f}"
        )
    print(
        f"\nparameters held per rank (GiB, fp32 shards): (a) {[round(r['local_parameters_gib'], 3) for r in a]}, "
        f"(b) {[round(r['local_parameters_gib'], 3) for r in b]}"
    )
    print(
        f"seconds since process start at set-up end: (a) {[round(r['seconds_since_process_start'], 1) for r in a]}, "
        f"(b) {[round(r['seconds_since_process_start'], 1) for r in b]}"
    )
    print(
        f"peak RSS after the loss (GiB): (a) {[round(r['peak_rss_after_loss_gib'], 2) for r in a]}, "
        f"(b) {[round(r['peak_rss_after_loss_gib'], 2) for r in b]}"
    )
    losses = [r["loss"] for r in a + b]
    print(
        f"loss of the fixed batch (ranks 0, 1): (a) {a[0]['loss']:.7f} {a[1]['loss']:.7f}   "
        f"(b) {b[0]['loss']:.7f} {b[1]['loss']:.7f}   max difference {max(losses) - min(losses):.2e}"
    )


def source_state() -> str:
    """The commit, and a hash of uncommitted changes under src/ (the code measured)."""
    import hashlib

    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *command], capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    head, diff = git("rev-parse", "--short", "HEAD").strip(), git("diff", "HEAD", "--", "src")
    return f"{head}+{hashlib.sha1(diff.encode()).hexdigest()[:10]}" if diff else head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-dir", default=None, help="the checkpoint, made if absent (default /tmp/hfbench/llama1b, or llama-NL)"
    )
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="decoder layers (20: 1.03B parameters)")
    parser.add_argument("--out", default=None, help="a JSON file for the figures")
    parser.add_argument("--work", default="/tmp/hfbench/work", help="the ranks' logs and figures")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one way may take")
    parser.add_argument("--role", default=None, choices=["make", *WAYS], help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_dir is None:
        args.model_dir = (
            "/tmp/hfbench/llama1b" if args.layers == DEFAULT_LAYERS else f"/tmp/hfbench/llama-{args.layers}l"
        )
    directory = Path(args.model_dir)
    if args.role == "make":
        make_checkpoint(directory, args.layers)
        return
    if args.role == "shardtrain":
        from shardtrain import Engine

        Engine(accelerator="cpu", devices=2, strategy="fsdp").launch(shardtrain_rank, args)
        return
    if args.role == "reference":
        reference_rank(args)
        return

    parameters = ensure_checkpoint(directory, args.layers)
    source = source_state()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {way: measure_way(way, directory, args.layers, work, args.timeout) for way in WAYS}
    print_table(results, parameters, args.layers)
    if args.out:
        report = {
            "model_dir": str(directory),
            "layers": args.layers,
            "parameters": parameters,
            "checkpoint_bytes": sum(p.stat().st_size for p in directory.glob("*.safetensors")),
            "source": source,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            **{way: {f"rank{rank}": figures for rank, figures in enumerate(ranks)} for way, ranks in results.items()},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
