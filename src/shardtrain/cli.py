"""``shardtrain <command>`` (also ``python -m shardtrain``): thin commands over the library.

    shardtrain fit --config run.yaml [--trainer.max_steps 100] [--strategy.sharding_strategy SHARD_GRAD_OP]
    shardtrain fit --ckpt_path runs/checkpoints/step=100      # resume with the config stored in the checkpoint
    shardtrain fit --config run.yaml --num-nodes 2 --node-rank 0 --main-address node0 --main-port 29500   # on node 0
    shardtrain fit --config run.yaml --num-nodes 2 --node-rank 1 --main-address node0 --main-port 29500   # on node 1
    shardtrain validate --config run.yaml [--ckpt_path best|last|DIR]   # the model's weights from ckpt_path
    shardtrain print-config --config run.yaml                 # the resolved config, defaults included
    shardtrain estimate --config run.yaml [--devices 8 --num-nodes 4 --device-memory 80GiB --host-memory 1TiB]
                                          [--tensor-parallel 8 [--sequence-parallel]] [--json]
    shardtrain consolidate CHECKPOINT OUT [--format safetensors|hf] [--hf-config DIR] [--merge-adapters] [--dtype bf16]
                          [--max-shard-size 5GiB] [--optimizer FILE]
    shardtrain verify CHECKPOINT [CHECKPOINT ...]   # each file against the checksums recorded when it was saved

Several machines without torchrun or SLURM: run the same command on every node with the same
``--num-nodes`` (the same as ``--trainer.num_nodes``), ``--main-address`` (node 0's address) and
``--main-port`` (a free port of node 0), and each node's own ``--node-rank`` (0 to N-1). Each node
starts its ``trainer.devices`` processes. The flags set ``NODE_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` before the Trainer is built; they are not part of the run config (``config.yaml``).
Under torchrun or ``srun`` those three come from the launcher and the flags are refused.

Class paths in a config (``model.class_path``, ``data.class_path``) are imported with the
current directory on ``sys.path``, as ``python -m`` would.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, MutableMapping

import torch

from shardtrain.checkpoint.consolidate import consolidate, consolidate_optimizer
from shardtrain.checkpoint.integrity import CHECKSUMS, verify
from shardtrain.checkpoint.pointer import resolve_checkpoint
from shardtrain.checkpoint.sharded import read_meta
from shardtrain.errors import ConfigError, ShardtrainError
from shardtrain.launch.environment import outside_launcher
from shardtrain.memory import parse_memory_size

RUN_COMMANDS = ("fit", "validate", "print-config", "estimate")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*RUN_COMMANDS, "consolidate", "verify"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        if argv[0] == "consolidate":
            return _consolidate(argv[1:])
        if argv[0] == "verify":
            return _verify(argv[1:])
        return _run(argv[0], argv[1:])
    except ShardtrainError as error:
        print(f"shardtrain {argv[0]}: {error}", file=sys.stderr)
        return 2


def _run(command: str, argv: list[str]) -> int:
    from shardtrain import config as run_config

    if "--help" in argv or "-h" in argv:
        run_config.build_parser(command).print_help()
        if command != "estimate":
            print()
            _node_parser(command).print_help()
        return 0
    if command == "estimate":
        return _estimate(argv)
    argv = _config_from_checkpoint(apply_node_flags(argv))
    parsed = run_config.parse(command, argv)
    if command == "print-config":
        print(run_config.dump(parsed), end="")
        return 0
    trainer, model, data = run_config.instantiate(parsed)
    if command == "fit":
        trainer.engine.launch()
        environment = trainer.engine.environment
        if environment.num_nodes > 1 and environment.local_rank == 0:
            print(f"[shardtrain] {environment.describe()}", flush=True)
        if trainer.is_global_zero:
            run_config.write_resolved_config(parsed, trainer.default_root_dir)
        trainer.fit(model, datamodule=data, ckpt_path=parsed.ckpt_path)
    else:  # validate: the DataModule's (or the model's) loaders; the results table is printed on rank 0
        trainer.validate(model, datamodule=data, ckpt_path=parsed.ckpt_path)
    return 0


def _node_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"shardtrain {command}", add_help=False, allow_abbrev=False, exit_on_error=False
    )
    group = parser.add_argument_group(
        "several machines",
        "Run the same command on every node, with its own --node-rank; not needed under torchrun or srun, which set the layout.",
    )
    group.add_argument(
        "--num-nodes", type=int, metavar="N", help="machines in the run: the same as --trainer.num_nodes"
    )
    group.add_argument("--node-rank", type=int, metavar="RANK", help="this machine's number, 0 to N-1 (sets NODE_RANK)")
    group.add_argument(
        "--main-address", metavar="HOST", help="node 0's address, reachable from every node (sets MASTER_ADDR)"
    )
    group.add_argument(
        "--main-port", type=int, metavar="PORT", help="a free port of node 0, the same on every node (sets MASTER_PORT)"
    )
    return parser


def apply_node_flags(argv: list[str], environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Take ``--num-nodes/--node-rank/--main-address/--main-port`` out of ``argv``.

    The last three set ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in ``environ``, where
    the Trainer reads the layout (``shardtrain.launch.environment``); ``--num-nodes N`` becomes
    ``--trainer.num_nodes N`` (after any ``--config``, so it wins). Returns the other arguments.
    """
    try:
        flags, rest = _node_parser("fit").parse_known_args(argv)
    except argparse.ArgumentError as error:
        raise ConfigError(f"{error}; e.g. --num-nodes 2 --node-rank 0 --main-address node0 --main-port 29500") from None
    given = {
        "NODE_RANK": ("--node-rank", flags.node_rank),
        "MASTER_ADDR": ("--main-address", flags.main_address),
        "MASTER_PORT": ("--main-port", flags.main_port),
    }
    given = {name: (flag, value) for name, (flag, value) in given.items() if value is not None}
    launcher = outside_launcher(environ)
    if launcher is not None and given:
        names = " ".join(flag for flag, _ in given.values())
        raise ConfigError(
            f"{names}: this process was started by {launcher}, which sets the rank layout and the main address; "
            f"drop {names} and give the node count and address to {launcher} instead (keep --num-nodes)"
        )
    environ.update({name: str(value) for name, (_, value) in given.items()})
    if flags.num_nodes is not None:
        rest += ["--trainer.num_nodes", str(flags.num_nodes)]
    return rest


def _estimate(argv: list[str]) -> int:
    """Per-device memory of the config's model under every strategy, what fits, and the pick."""
    from shardtrain import config as run_config
    from shardtrain.estimate.table import device_memory_bytes, estimate_memory

    layout = argparse.ArgumentParser(prog="shardtrain estimate", add_help=False)
    layout.add_argument("--devices", type=int, default=None)
    layout.add_argument("--num-nodes", type=int, default=None)
    layout.add_argument("--device-memory", default=None)
    layout.add_argument("--host-memory", default=None)
    layout.add_argument("--tensor-parallel", type=int, default=None)
    layout.add_argument("--sequence-parallel", action="store_true")
    layout.add_argument("--context-parallel", type=int, default=None)
    layout.add_argument("--json", action="store_true")
    options, rest = layout.parse_known_args(argv)
    parsed = run_config.parse("estimate", rest)
    model = run_config.build_parser("estimate").instantiate(parsed).model
    trainer, strategy = parsed.trainer, dict(parsed.strategy)
    devices = options.devices or trainer.devices
    if devices == "auto":  # as the Engine resolves it without a launcher
        import torch

        cuda = trainer.accelerator in ("cuda", "gpu") or (trainer.accelerator == "auto" and torch.cuda.is_available())
        devices = torch.cuda.device_count() if cuda else 1
    num_nodes = options.num_nodes or trainer.num_nodes
    data_args = (
        (parsed.data or {}).get("init_args", {})
        if isinstance(parsed.data, dict)
        else vars(getattr(parsed.data, "init_args", None) or {})
    )
    estimate = estimate_memory(
        model,
        devices=devices,
        num_nodes=num_nodes,
        precision=str(trainer.precision),
        batch_size=int(data_args.get("batch_size", 1)),
        activation_checkpointing=strategy.get("activation_checkpointing_policy") is not None,
        **_tensor_parallel_options(strategy, options.tensor_parallel, options.sequence_parallel),
        context_parallel_size=options.context_parallel
        or (
            strategy.get("context_parallel_size") if str(strategy.get("name", "")).lower() == "model_parallel" else None
        ),
    )
    local_device, local_host = device_memory_bytes("cuda" if trainer.accelerator in ("cuda", "gpu") else "cpu", devices)
    device_memory = parse_memory_size(options.device_memory) if options.device_memory else local_device
    host_memory = parse_memory_size(options.host_memory) // devices if options.host_memory else local_host
    pick, reason = estimate.recommend(device_memory, host_memory)
    if options.json:
        import json

        payload = json.loads(estimate.to_json())
        payload["fits"] = {s.strategy: s.fits(device_memory, host_memory, 0.9) for s in estimate.strategies}
        payload["recommended"], payload["reason"] = pick, reason
        print(json.dumps(payload, indent=1))
        return 0
    estimate.device_memory, estimate.host_memory_per_device = device_memory, host_memory
    print(estimate)  # the table, with a fits column
    print(f"recommended: {reason}")
    return 0


def _tensor_parallel_options(strategy: dict[str, Any], flag: int | None, sequence_flag: bool) -> dict[str, Any]:
    """The ``model_parallel`` row's degree and plan: ``--tensor-parallel``, else the config's
    ``model_parallel`` strategy's ``tensor_parallel_size``; its ``tp_plan`` and ``sequence_parallel``
    either way (``--sequence-parallel`` too)."""
    model_parallel = str(strategy.get("name", "")).lower() == "model_parallel"
    size = strategy.get("tensor_parallel_size") if model_parallel else None
    return {
        "tensor_parallel_size": flag if flag is not None else (size if isinstance(size, int) else None),
        "tp_plan": strategy.get("tp_plan") if model_parallel else None,
        "sequence_parallel": sequence_flag or (model_parallel and strategy.get("sequence_parallel") is True),
    }


def _config_from_checkpoint(argv: list[str]) -> list[str]:
    """With ``--ckpt_path`` and no ``--config``, use the run config stored in the checkpoint."""
    if "--config" in argv or "--ckpt_path" not in argv:
        return argv
    from shardtrain.checkpoint import read_meta

    path = resolve_checkpoint(argv[argv.index("--ckpt_path") + 1])
    stored = read_meta(path)["state"].get("trainer_config", {}).get("run")
    if stored is None:
        raise ShardtrainError(f"{path} holds no run config (it was not saved by `shardtrain fit`); pass --config")
    import yaml

    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    yaml.safe_dump(stored, handle)
    handle.close()
    return ["--config", handle.name, *argv]


def _consolidate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="shardtrain consolidate", description="export a sharded checkpoint's model weights to safetensors"
    )
    parser.add_argument(
        "checkpoint", help="a checkpoint directory (e.g. runs/checkpoints/step=1000), or a `last` pointer file"
    )
    parser.add_argument("output", help="model.safetensors, or a directory for several files with an index")
    parser.add_argument("--key", default=None, help="which module of the checkpoint (default: its first)")
    parser.add_argument(
        "--max-shard-size",
        default="5GiB",
        type=parse_memory_size,
        help="split into files of at most this size (default 5GiB)",
    )
    parser.add_argument(
        "--optimizer",
        default=None,
        metavar="FILE",
        help="also write the optimizer state tensors to this .safetensors file",
    )
    parser.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="safetensors: the weights as the checkpoint names them; hf: a directory transformers' from_pretrained loads",
    )
    parser.add_argument(
        "--hf-config",
        default=None,
        metavar="DIR",
        help="--format hf: the model directory the run started from (default: the one the checkpoint recorded)",
    )
    parser.add_argument(
        "--merge-adapters",
        action="store_true",
        help="--format hf of a run that trained peft adapters: the model with them merged in (default: the adapters)",
    )
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="convert the weights")
    args = parser.parse_args(argv)
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # a `last` pointer: the checkpoint it names
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    if args.format == "hf":
        from shardtrain.hf.export import export_hf

        files = export_hf(
            args.checkpoint,
            args.output,
            config=args.hf_config,
            max_shard_bytes=args.max_shard_size,
            dtype=dtype,
            merge_adapters=args.merge_adapters,
        )
    else:
        files = consolidate(
            args.checkpoint, args.output, key=args.key, max_shard_bytes=args.max_shard_size, dtype=dtype
        )
    if args.optimizer:
        files.append(consolidate_optimizer(args.checkpoint, args.optimizer))
    for path in files:
        print(path)
    return 0


def _verify(argv: list[str]) -> int:
    """Exit 0 when every checkpoint verifies (or records no checksums: said), 1 when any is damaged."""
    parser = argparse.ArgumentParser(
        prog="shardtrain verify",
        description="check each file of sharded checkpoints against the sizes and CRC-32s recorded when they were saved",
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories, or `last` pointer files")
    args = parser.parse_args(argv)
    damaged = 0
    for given in args.checkpoints:
        path = resolve_checkpoint(given)
        assert path is not None
        meta = read_meta(path)
        recorded = meta.get(CHECKSUMS) or {}
        if not recorded:
            print(f"{path}: no checksums recorded (saved before shardtrain recorded them); not verifiable")
            continue
        problems = verify(path, meta, distributed=False)
        damaged += bool(problems)
        summary = "DAMAGED" if problems else "ok"
        print(f"{path}: {summary} ({len(recorded)} files, {sum(f['bytes'] for f in recorded.values())} bytes)")
        for problem in problems:
            print(f"  {problem}")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
