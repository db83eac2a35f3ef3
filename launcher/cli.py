"""`lorasp launch`, added to the `lorasp` command through the `lorasp.commands` entry-point group.

    lorasp launch CONFIG [k=v ...] [--address auto|HOST:PORT] [--num-workers N] [--gpus-per-worker G]
                  [--cpus-per-worker C] [--resume RUN_DIR] [--dry-run] [--force]

Exit codes (launcher.ray_launch): 0 finished, 1 failed after launcher.max_failures restarts, 2 bad input,
3 stopped on SIGUSR1, SIGTERM or Ctrl-C with a checkpoint saved (resume with --resume RUN_DIR), 4 stopped on a NaN/inf
loss or gradient norm (train.max_nonfinite_steps) with nothing saved from those steps, 130 aborted by a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from lorasp_dist.config import load_config, redact_override
from lorasp_dist.inputs import check_inputs

# flag -> the config field it overrides, so flags and config are validated (and reported) the same way
FLAG_FIELDS = {"address": "launcher.address", "num_workers": "launcher.num_workers",
               "gpus_per_worker": "launcher.gpus_per_worker", "cpus_per_worker": "launcher.cpus_per_worker"}


def add_launch_command(sub) -> None:
    p = sub.add_parser(
        "launch", help="start the ranks through Ray Train (a local Ray instance if no address)",
        description="Start every rank through Ray Train on a new local Ray instance, or on an existing cluster "
        "(--address). Flags and k=v overrides may come in any order after CONFIG. Exit codes: 0 finished, "
        "1 failed after launcher.max_failures restarts, 2 bad input, 3 stopped on SIGUSR1, SIGTERM or Ctrl-C with a "
        "checkpoint saved (resume with --resume RUN_DIR), 4 stopped on a NaN/inf loss or gradient norm with nothing "
        "saved from those steps (RUN_DIR/nonfinite.json), 130 aborted by a second Ctrl-C.",
    )
    _add_flags(p)
    p.add_argument("config", help="run config YAML (see examples/)")
    # REMAINDER: argparse would reject a flag between two overrides; cmd_launch splits them again.
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="dotted overrides, e.g. train.max_steps=10 launcher.max_failures=1")
    p.set_defaults(func=cmd_launch)


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: a local instance)")
    p.add_argument("--num-workers", type=int, help="ranks (launcher.num_workers)")
    p.add_argument("--gpus-per-worker", type=float, help="0 for CPU workers (launcher.gpus_per_worker)")
    p.add_argument("--cpus-per-worker", type=float, help="launcher.cpus_per_worker")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue this run directory from its newest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the placement and the memory plan; start nothing")
    p.add_argument("--force", action="store_true", help="launch even if the memory plan says it does not fit")


def cmd_launch(args: argparse.Namespace) -> int:
    late = argparse.ArgumentParser(prog="lorasp launch", add_help=False, argument_default=argparse.SUPPRESS)
    _add_flags(late)
    flags, args.overrides = late.parse_known_args(args.overrides)  # flags given after the first override
    vars(args).update(vars(flags))
    fields = [f"{field}={value}" for key, field in FLAG_FIELDS.items() if (value := getattr(args, key)) is not None]
    cfg = load_config(args.config, [*args.overrides, *fields])
    check_inputs(cfg)  # paths, data columns, tokenizer, context: one line in a second, before torch and Ray load
    from launcher.ray_launch import launch

    try:
        return launch(cfg, resume=args.resume, dry=args.dry_run, force=args.force, command=_command(args))
    except KeyboardInterrupt:
        # Aborted by a second Ctrl-C: Ray is shut down and the run directory's lock released. Ray Train's fit may
        # still be blocked inside Ray's core worker on its daemon thread, and one such exit in ~15 test runs ended in
        # SIGSEGV (-11, not 130): nothing is left to finalize, so the interpreter's finalization is skipped.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def _command(args: argparse.Namespace) -> str:
    """This command line without --resume/--dry-run/--force: what to run again, plus --resume RUN_DIR. Printed and
    logged, so a secret `env` value in it is redacted."""
    words = ["lorasp", "launch", args.config, *map(redact_override, args.overrides)]
    for key in FLAG_FIELDS:
        if (value := getattr(args, key)) is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(words)
