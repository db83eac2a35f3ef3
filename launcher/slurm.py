"""`lorasp slurm`: render slurm/lorasp.sbatch from a run config and submit it; look at the job afterwards.

    lorasp slurm submit CONFIG [k=v ...] [--nodes N] [--gpus-per-node G] [--cpus-per-node C] [--partition P]
                        [--time T] [--account A] [--sbatch OPTION ...] [--resume RUN_DIR] [--template FILE] [--dry-run]
    lorasp slurm status JOBID
    lorasp slurm logs JOBID [--follow]

The template stays a plain sbatch script (usable by hand); rendering only rewrites its `#SBATCH` lines, the defaults
of its settings, and the line that supplies its arguments. The run name is fixed at submit time so that a requeued
job finds its run directory again. Every SLURM command honours `SLURM_CONF` from the environment.

Every value that reaches the script is checked against what its option accepts before anything is rendered: a
newline in an `#SBATCH` value would end the directive and start a command of its own (before `set -euo pipefail`),
and sbatch stops reading directives at the first command, so the ones after it would be dropped silently.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lorasp_dist.config import REDACTED, RUN_NAME, ConfigError, RunConfig, load_config, secret_override
from lorasp_dist.inputs import check_inputs
from lorasp_dist.shipped import shipped

TEMPLATE = shipped("slurm/lorasp.sbatch")
ARGS_LINE = "[ $# -gt 0 ] || set --"
GPU_COUNT = re.compile(r"(?:[A-Za-z0-9_.-]+:)?(\d+)")  # sbatch's --gpus-per-node: [type:]count, matched whole

# What a value may hold, per option: (pattern of the whole value, what to tell the user). No whitespace, quote,
# backslash, `$`, backtick, `;` or control character anywhere.
ACCEPTED = {
    "run name": (RUN_NAME.pattern, "one directory name: letters, digits, '.', '_' and '-', not starting with '.' "
                 "(train.run_name's rule: the job passes it on)"),
    "--partition": (r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", "a partition name, or several separated by commas "
                    "(letters, digits and _ . -)"),
    "--account": (r"[A-Za-z0-9_.-]+", "an account name (letters, digits and _ . -)"),
    "--time": (r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE",
               "MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS[:MINUTES[:SECONDS]] or UNLIMITED"),
    "path": (r"/[A-Za-z0-9_./+,:@=~-]*", "an absolute path of letters, digits and _ . / + , : @ = ~ -"),
    "--sbatch": (r"--[a-z][a-z0-9-]*(=[A-Za-z0-9_./+,:@=%~&|*\[\]-]+)?",
                 "--OPTION or --OPTION=VALUE, the value of letters, digits and _ . / + , : @ = % ~ & | * [ ] -"),
    "host": (r"[A-Za-z0-9_.:-]+", "a host name or IP address"),
}


@dataclass
class Job:
    """What a rendered script holds: sbatch options, settings (environment defaults) and the script's arguments."""

    run_dir: Path
    args: list[str]  # RUN_DIR CONFIG [overrides]
    options: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


def log_path(run_dir: Path, job_id: str) -> Path:
    """The job's SLURM output: next to the run directory, which `lorasp launch` must create itself."""
    return run_dir.with_name(f"{run_dir.name}.slurm-{job_id}.out")


# --- rendering ---------------------------------------------------------------------------------------------------

def check(field: str, value: str, kind: str | None = None) -> str:
    """`value` if it is wholly what `kind` (default: the field itself) accepts, else a ConfigError naming both."""
    pattern, accepted = ACCEPTED[kind or field]
    if not re.fullmatch(pattern, value):
        raise ConfigError(f"{field} = {value!r}: expected {accepted}")
    return value


def check_printable(field: str, value: str) -> str:
    """A value the script receives shell-quoted (an argument, a setting): any character but a control character."""
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ConfigError(f"{field} = {value!r}: expected no newline or other control character")
    return value


def render(template: str, job: Job) -> str:
    """The template with the job's #SBATCH options, setting defaults and arguments filled in."""
    lines = template.splitlines()
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH ")]
    if not sbatch or ARGS_LINE not in lines:
        raise ConfigError(f"--template: not a lorasp sbatch template (no #SBATCH lines or no `{ARGS_LINE}` line)")
    # The template's own directives stay as written, in their order; the job's replace them or follow them.
    header = {_option(lines[i])[0]: lines[i] for i in sbatch}
    header.update((k, f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={v}") for k, v in job.options.items())
    lines = lines[: sbatch[0]] + list(header.values()) + [
        line for i, line in enumerate(lines) if i > sbatch[0] and i not in sbatch
    ]
    for name, value in job.settings.items():
        pattern = re.compile(rf"^(export )?{name}=\$\{{{name}:-[^}}]*\}}")
        hits = [(i, m) for i, line in enumerate(lines) if (m := pattern.match(line))]
        if not hits:
            raise ConfigError(f"--template: no `{name}=${{{name}:-...}}` setting to fill in")
        i, m = hits[0]
        lines[i] = f"{m[1] or ''}{name}=${{{name}:-{shlex.quote(value)}}}{lines[i][m.end():]}"
    lines[lines.index(ARGS_LINE)] = f"{ARGS_LINE} {shlex.join(job.args)}"
    _check_directives_first(lines)
    return "\n".join(lines) + "\n"


def _check_directives_first(lines: list[str]) -> None:
    """sbatch reads `#SBATCH` lines only up to the first command: every one must come before it."""
    first_command = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), len(lines))
    late = [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    if late:
        raise ConfigError(f"--template: {late[0]!r} comes after the first command ({lines[first_command]!r}), where "
                          "sbatch no longer reads directives; put every #SBATCH line before any command")


def _option(line: str) -> tuple[str, str | None]:
    key, eq, value = line.removeprefix("#SBATCH ").strip().removeprefix("--").partition("=")
    return key, value if eq else None


def _executable(name: str) -> str:
    """`name` from this Python's environment (a virtualenv's bin/), so the job runs the code that submitted it."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


def plan_job(cfg: RunConfig, args: argparse.Namespace) -> Job:
    """The rendered job for this config and these flags; every inconsistency is a ConfigError naming the flag."""
    from launcher.local_ray import LOCAL_OBJECT_STORE_BYTES
    from lorasp_dist.engine.run_dir import unique_run_name

    lc = cfg.launcher
    for flag, value in (("--nodes", args.nodes), ("--cpus-per-node", args.cpus_per_node)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} = {value}: must be 1 or more")
    workers_per_node = math.ceil(lc.num_workers / args.nodes)
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = str(math.ceil(workers_per_node * lc.gpus_per_worker))
    match = GPU_COUNT.fullmatch(gpus)  # not .match: `$` lets a trailing newline through
    if not match:
        raise ConfigError(f"--gpus-per-node = '{gpus}': expected a count or TYPE:COUNT, e.g. 8 or a100:8")
    gpu_count = int(match[1])
    cpus = args.cpus_per_node or math.ceil(workers_per_node * lc.cpus_per_worker)
    # Ray places whole workers on nodes: count how many fit on one node, times the nodes.
    fits = math.floor(cpus / lc.cpus_per_worker)
    if lc.gpus_per_worker:
        fits = min(fits, math.floor(gpu_count / lc.gpus_per_worker))
    if fits * args.nodes < lc.num_workers:
        raise ConfigError(
            f"launcher.num_workers = {lc.num_workers}: {args.nodes} node(s) x ({cpus} CPUs, {gpu_count} GPUs) hold "
            f"{fits * args.nodes} workers of ({lc.cpus_per_worker:g} CPUs, {lc.gpus_per_worker:g} GPUs); raise "
            "--nodes, --gpus-per-node or --cpus-per-node, or lower launcher.num_workers"
        )
    if gpu_count and not lc.gpus_per_worker:
        print(f"warning: --gpus-per-node {gpus} but launcher.gpus_per_worker = 0: the ranks run on CPUs, the GPUs "
              "idle; set launcher.gpus_per_worker=1 to use them", file=sys.stderr)

    if args.resume is not None:
        run_dir = args.resume.expanduser().resolve()
        check("--resume", str(run_dir), "path")
        check("--resume", run_dir.name, "run name")
        if not run_dir.is_dir():
            raise ConfigError(f"--resume '{args.resume}': no such run directory")
    else:
        storage = Path(lc.storage_path or cfg.train.output_dir).expanduser().resolve()
        check("launcher.storage_path" if lc.storage_path else "train.output_dir", str(storage), "path")
        run_dir = storage / check("train.run_name", cfg.train.run_name or unique_run_name(cfg), "run name")
        if run_dir.exists():
            raise ConfigError(
                f"train.run_name = '{run_dir.name}': {run_dir} exists; continue it with --resume {run_dir}, "
                "or choose another name (leave train.run_name unset for a unique one)"
            )

    options = {"job-name": run_dir.name, "nodes": str(args.nodes), "cpus-per-task": str(cpus)}
    if gpu_count:
        options["gpus-per-node"] = gpus
    for key in ("partition", "time", "account"):
        if getattr(args, key) is not None:
            options[key] = check(f"--{key}", getattr(args, key))
    cwd = check("--chdir (the current directory)", os.getcwd(), "path")
    options.update(output=str(log_path(run_dir, "%j")), chdir=cwd, comment=f"lorasp:{run_dir}")
    for extra in args.sbatch:
        if not extra.startswith("--"):
            raise ConfigError(f"--sbatch = {extra!r}: give sbatch's long form, e.g. --sbatch=--mem=0")
        options.update([_option(f"#SBATCH {check('--sbatch', extra)}")])

    object_store = lc.object_store_memory or LOCAL_OBJECT_STORE_BYTES  # the ranks pass nothing large through it
    settings = {
        "LORASP": _executable("lorasp"),
        "RAY": _executable("ray"),
        "PYTHON": sys.executable,
        "LORASP_RAY_ARGS": f"--object-store-memory={object_store}",
        "LORASP_DASHBOARD_HOST": check("launcher.dashboard_host", lc.dashboard_host, "host"),
        "RAY_memory_monitor_refresh_ms": "0" if not lc.memory_monitor else "250",
    }
    for name, value in settings.items():
        check_printable(name, value)
    config = check_printable("CONFIG", str(Path(args.config).expanduser().resolve()))
    for override in args.overrides:
        if key := secret_override(override):
            raise ConfigError(f"env.{key} = {REDACTED}: a secret given on the command line would be written into the "
                              "batch script, which SLURM stores and shows; put it in the config file's env section, "
                              "or in the environment of the shell that submits")
    overrides = [check_printable(override.partition("=")[0], override) for override in args.overrides]
    return Job(run_dir, [str(run_dir), config, *overrides], options, settings)


# --- SLURM commands ----------------------------------------------------------------------------------------------

def _slurm(*argv: str, input: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which(argv[0])
    if exe is None:
        raise ConfigError(
            f"{argv[0]}: not found on PATH; run this on a SLURM login node (or where the SLURM client commands are "
            "installed), or use `lorasp slurm submit --dry-run` to print the script"
        )
    return subprocess.run([exe, *argv[1:]], input=input, capture_output=True, text=True)


def _slurm_error(proc: subprocess.CompletedProcess) -> str:
    return "; ".join(line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip())


def check_partition_gpus(partition: str | None) -> None:
    """GPUs asked of a partition without any: SLURM would only say "Requested node configuration is not available"."""
    proc = _slurm("sinfo", "-h", "-o", "%P %G")
    rows = [line.split(None, 1) for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")]
    rows = [r for r in rows if r[0].rstrip("*") == (partition or r[0].rstrip("*"))]
    if rows and not any("gpu" in (r[1] if len(r) > 1 else "") for r in rows):
        name = rows[0][0].rstrip("*")
        raise ConfigError(
            f"--gpus-per-node: partition '{name}' has no GPUs (sinfo lists no gpu GRES on its nodes); choose a GPU "
            "partition with --partition (`sinfo -o '%P %G'` lists them), or use CPU workers: --gpus-per-node 0 "
            "launcher.gpus_per_worker=0"
        )


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)  # bad input ends now, not after the job has waited in the queue
    job = plan_job(cfg, args)
    template = Path(args.template)
    if not template.is_file():
        raise ConfigError(f"--template '{template}': not found (the project's is slurm/lorasp.sbatch)")
    script = render(template.read_text(), job)
    if args.dry_run:
        print(script, end="")
        return 0
    if "gpus-per-node" in job.options:
        check_partition_gpus(job.options.get("partition"))
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)  # for the SLURM log; the run dir is the launcher's to make
    proc = _slurm("sbatch", "--parsable", input=script)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused the job: {_slurm_error(proc)}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}")
    print(f"run dir: {job.run_dir}")
    print(f"log:     {log_path(job.run_dir, job_id)}")
    print(f"status:  lorasp slurm status {job_id}    logs: lorasp slurm logs {job_id} --follow", flush=True)
    return 0


def job_record(job_id: str) -> dict[str, str]:
    """What SLURM knows of a job: slurmctld while it remembers it (MinJobAge after the end), else accounting."""
    # It reaches scontrol's and sacct's command lines (where `--clusters=x` would be an option) and a log's file name.
    if not re.fullmatch(r"\d+(_\d+)?(\+\d+)?", job_id):
        raise ConfigError(f"JOBID = {job_id!r}: expected a SLURM job id, e.g. 1234 (an array task 1234_5, a "
                          "heterogeneous component 1234+1)")
    proc = _slurm("scontrol", "show", "job", "-o", job_id)
    if proc.returncode == 0 and proc.stdout.strip():
        return dict(item.partition("=")[::2] for item in proc.stdout.split())
    why = _slurm_error(proc)
    acct = _slurm("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,Reason,Restarts,Elapsed,Timelimit,"
                  "NodeList,ExitCode,WorkDir,Comment")
    line = acct.stdout.strip().splitlines()[0] if acct.returncode == 0 and acct.stdout.strip() else ""
    if not line:
        raise ConfigError(f"job {job_id}: unknown to SLURM ({why}; sacct: {_slurm_error(acct) or 'no record'})")
    keys = ("JobId", "JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "NodeList", "ExitCode", "WorkDir",
            "Comment")
    return dict(zip(keys, line.split("|")))


def _run_dir(record: dict[str, str]) -> Path | None:
    comment = record.get("Comment", "")
    return Path(comment.removeprefix("lorasp:")) if comment.startswith("lorasp:") else None


def run_state(run_dir: Path) -> str:
    """Where a run stands, from its directory: finished, its newest valid checkpoint, or why it has none."""
    from lorasp_dist.engine import checkpoint as ckpt

    if not run_dir.is_dir():
        return "not created yet"
    if (run_dir / "summary.json").is_file():
        return "finished"
    found = ckpt.newest_valid(run_dir)
    if found.newest is not None:
        return f"newest checkpoint at step {found.step}"
    if found.corrupt:  # a resume refuses these unless train.restart_if_corrupt
        name, why = found.corrupt[0][0].name, found.corrupt[0][1]
        return f"{len(found.corrupt)} checkpoint(s), none valid; newest {name}: {why}"
    return "no checkpoint yet"


def cmd_status(args: argparse.Namespace) -> int:
    r = job_record(args.job_id)
    print(f"job {args.job_id}: {r.get('JobState', '?')} (reason {r.get('Reason', '?')}, restarts "
          f"{r.get('Restarts', '?')}, exit code {r.get('ExitCode', '?')})")
    print(f"time:    {r.get('RunTime', '?')} of {r.get('TimeLimit', '?')} on {r.get('NodeList', '?')}")
    run_dir = _run_dir(r)
    if run_dir is None:
        print("run dir: unknown (not submitted by `lorasp slurm submit`)")
        return 0
    print(f"run dir: {run_dir} ({run_state(run_dir)})")
    print(f"log:     {r.get('StdOut') or log_path(run_dir, args.job_id)}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    r = job_record(args.job_id)
    run_dir = _run_dir(r)
    log = Path(r["StdOut"]) if r.get("StdOut") else (log_path(run_dir, args.job_id) if run_dir else None)
    if log is None or not log.is_file():
        state = r.get("JobState", "?")
        raise ConfigError(f"job {args.job_id}: no log file yet ({state}; expected {log or 'unknown'})")
    if args.follow:
        os.execvp("tail", ["tail", "-n", "+1", "-f", str(log)])
    sys.stdout.write(log.read_text(errors="replace"))
    if run_dir is not None:
        print(f"# every rank's log: {run_dir / 'logs'}", file=sys.stderr)
    return 0


# --- the sub-command ---------------------------------------------------------------------------------------------

def add_slurm_command(sub) -> None:
    p = sub.add_parser("slurm", help="run on a SLURM allocation: submit, status, logs",
                       description="Submit a run as a SLURM batch job (Ray on the allocation, then `lorasp launch`), "
                       "and look at it afterwards.")
    ssub = p.add_subparsers(dest="slurm_command", required=True, metavar="ACTION")

    s = ssub.add_parser("submit", help="render slurm/lorasp.sbatch for a run config and sbatch it",
                        description="Render the sbatch script for a run config and submit it. The job starts Ray on "
                        "its nodes, runs `lorasp launch --address`, checkpoints and requeues itself on USR1 "
                        "(preemption, walltime) and continues in the same run directory; `scancel` checkpoints "
                        "and stops it. Every value is checked: no newline, quote or shell character reaches the "
                        "script.")
    s.add_argument("config", help="run config YAML (see examples/)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, before the flags: e.g. train.max_steps=100")
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--gpus-per-node", default=None, metavar="G",
                   help="GPUs per node, COUNT or TYPE:COUNT (default: what launcher.num_workers x gpus_per_worker "
                   "needs)")
    s.add_argument("--cpus-per-node", type=int, default=None, metavar="C",
                   help="CPUs per node (default: what launcher.num_workers x cpus_per_worker needs)")
    s.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    s.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00; the job requeues itself 2 min before")
    s.add_argument("--account", default=None, help="SLURM account to charge")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="any other sbatch option, e.g. --sbatch=--mem=0 --sbatch=--exclusive (repeatable)")
    s.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue this run directory (from its newest checkpoint) in a new job")
    s.add_argument("--template", default=str(TEMPLATE), help="the sbatch template (default: slurm/lorasp.sbatch)")
    s.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    s.set_defaults(func=cmd_submit)

    s = ssub.add_parser("status", help="a job's state (squeue/scontrol, or sacct) and its run directory")
    s.add_argument("job_id", metavar="JOBID")
    s.set_defaults(func=cmd_status)

    s = ssub.add_parser("logs", help="print a job's output (the SLURM log next to its run directory)")
    s.add_argument("job_id", metavar="JOBID")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows (tail -f)")
    s.set_defaults(func=cmd_logs)
