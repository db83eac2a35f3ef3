"""`lorasp launch`: run the engine's per-rank loop on a Ray cluster through Ray Train's TorchTrainer.

Ray Train places one worker per GPU (or CPU slot), sets MASTER_ADDR / RANK / LOCAL_RANK / WORLD_SIZE, builds the
process group, and restarts the whole group when a worker dies (FailureConfig.max_failures); the new group resumes
from the run's newest checkpoint (launcher/worker.py). Nothing here needs plain actors: Ray Train covers placement,
restarts and storage.

The run directory is one directory for both: Ray Train's `storage_path/name` is the engine's
`train.output_dir/train.run_name`. Names are unique unless `train.run_name` is set; an existing run directory is only
ever continued on purpose, with `--resume RUN_DIR`. For a multi-node cluster the storage path must be shared.
This driver holds the run directory's lock (engine/run_dir.py) from before the first worker starts to the end, across
restarts of the worker group. The engine alone keeps and prunes checkpoints: none is handed to Ray Train, whose
bookkeeping would count a step saved again after a resume twice and delete the rewritten one.

Stopping (SLURM preemption or walltime, an operator, Ctrl-C): SIGUSR1, SIGTERM or SIGINT to this process touches
`RUN_DIR/STOP`; a second Ctrl-C aborts at once.
Ray Train runs the train function off the main thread of its workers, where no signal handler can run, so the file
is the relay: every rank sees it at the next step boundary, checkpoints and returns. We then exit EXIT_STOPPED.

A NaN/inf loss stops the run too (the engine, train.max_nonfinite_steps): the ranks return on purpose, so Ray does not
restart them as it would after a crash, and `RUN_DIR/nonfinite.json` tells us to exit EXIT_NONFINITE.

Exit codes: 0 finished, 1 failed after max_failures restarts, 2 bad input, 3 stopped on request, 4 stopped on NaN/inf.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from launcher.local_ray import isolate_local_instance
from launcher.signals import StopRelay
from lorasp_dist.atomic import atomic_write_text
from lorasp_dist.config import ConfigError, RunConfig, validate
from lorasp_dist.engine import checkpoint as ckpt
from lorasp_dist.engine.run_dir import RunLock, is_run, unique_run_name
from lorasp_dist.memory.plan import format_plan_table, launch_plan, shortfall

EXIT_OK = 0  # finished: the adapter and the memory report are in the run directory
EXIT_FAILED = 1  # the run failed, and went on failing through launcher.max_failures restarts: see RUN_DIR/logs
EXIT_USAGE = 2  # bad input (a config field, a path, a cluster that cannot hold the run): one line on stderr
# EXIT_STOPPED (3): stopped on request (SIGUSR1, SIGTERM, SIGINT) with a checkpoint saved: resume with --resume RUN_DIR
# EXIT_NONFINITE (4): stopped on NaN/inf (train.max_nonfinite_steps), nothing saved from those steps


@dataclass
class LaunchPlan:
    cfg: RunConfig  # as every worker receives it: absolute paths, the run directory fixed
    storage: Path
    name: str
    address: str  # for people: "a new local Ray instance" or the cluster's address

    @property
    def run_dir(self) -> Path:
        return self.storage / self.name


def make_plan(cfg: RunConfig, resume: Path | None = None) -> LaunchPlan:
    if resume is not None:
        run_dir = resume.expanduser().resolve()
        if not run_dir.is_dir():
            raise ConfigError(f"--resume '{resume}': no such run directory")
        if not is_run(run_dir):
            raise ConfigError(f"--resume '{resume}': not a run directory (no config.yaml or checkpoints/ in it); "
                              "give the directory a `lorasp launch` made")
        storage, name = run_dir.parent, run_dir.name
        found = ckpt.resume_point(run_dir, cfg.train.restart_if_corrupt)
        start = found.newest.name if found.newest else "step 0"
        for path, why in found.corrupt:
            print(f"[lorasp] {path.name} is corrupt ({why}): the run continues from {start} and moves it to "
                  f"checkpoints/{ckpt.CORRUPT}/", file=sys.stderr)
        _check_world_size(found, cfg.launcher.num_workers)
    else:
        storage = Path(cfg.launcher.storage_path or cfg.train.output_dir).expanduser().resolve()
        name = cfg.train.run_name or unique_run_name(cfg)
        if (storage / name).exists():
            raise ConfigError(_taken(storage / name))
    data = cfg.model_dump(mode="json")
    # Ray Train starts workers in its own working directory: every relative path is the driver's, made absolute.
    warm_start = cfg.train.resume not in ("auto", "never")  # a checkpoint to start from
    paths = [("model", "path"), ("data", "path"), ("data", "tokenizer")]
    if warm_start:
        paths.append(("train", "resume"))
    for section, key in paths:
        if data[section][key] is not None:
            data[section][key] = str(Path(data[section][key]).expanduser().resolve())
    # A new run directory is empty: train.resume (auto) finds nothing, or warm-starts from an explicit path. Once the
    # run has checkpoints, every (re)start resumes from its newest (launcher/worker.py).
    # --resume continues the run's own checkpoints; before its first one, it keeps the warm start it began from.
    own = resume is not None and not (warm_start and found.newest is None)
    data["train"].update(output_dir=str(storage), run_name=name, resume="auto" if own else data["train"]["resume"])
    data["launcher"]["storage_path"] = str(storage)
    address = cfg.launcher.address or "a new local Ray instance on this host"
    return LaunchPlan(validate(data), storage, name, address)


def _taken(run_dir: Path) -> str:
    return (f"train.run_name = '{run_dir.name}': {run_dir} exists; continue it with --resume {run_dir}, or choose "
            "another name (leave train.run_name unset for a unique one)")


def _check_world_size(found: ckpt.Found, workers: int) -> None:
    """ZeRO-3 optimizer partitions only load into the world size that wrote them: say so now, not after restarts."""
    written_by = found.manifest["world_size"] if found.manifest else workers
    if written_by != workers:
        raise ConfigError(
            f"launcher.num_workers = {workers}: {found.newest} was written by {written_by} ranks; ZeRO-3 optimizer "
            f"partitions need the same world size: use --num-workers {written_by}"
        )


# --- memory plan and dry run -------------------------------------------------------------------------------------

def check_memory(cfg: RunConfig, gpu_mem: int | None = None) -> None:
    """Refuse a run that the memory plan says does not fit, with its headroom (`lorasp plan` prints the table).
    `gpu_mem`: one GPU's memory read on the cluster, when memory.gpu_mem is not set."""
    why = shortfall(*launch_plan(cfg, gpu_mem))
    if why:
        raise ConfigError(
            f"launcher.num_workers = {cfg.launcher.num_workers}: the memory plan does not fit: {why}; `lorasp plan` "
            "shows the table and a setting that fits: offload (deepspeed.config=zero3_offload_optimizer or "
            "zero3_offload_all), lower train.micro_batch_size, add workers, or pass --force"
        )


def describe(plan: LaunchPlan) -> str:
    from launcher.cluster import worker_resources

    cfg, lc = plan.cfg, plan.cfg.launcher
    each = ", ".join(f"{v:g} {k}" for k, v in worker_resources(cfg).items())
    return "\n".join([
        f"workers:  {lc.num_workers} Ray Train workers x ({each}), torch backend {lc.torch_backend}",
        f"cluster:  {plan.address}",
        f"run dir:  {plan.run_dir}",
        f"restarts: up to {lc.max_failures}, from the newest of the last {cfg.train.keep_last} checkpoints "
        f"(every {cfg.train.save_every or cfg.train.max_steps} steps)",
    ])


def dry_run(plan: LaunchPlan) -> int:
    print("# resolved config, as every worker receives it")
    print(plan.cfg.to_yaml(), end="")
    print("\n# placement")
    print(describe(plan))
    print("\n# memory plan")
    print(format_plan_table(*launch_plan(plan.cfg)))
    return EXIT_OK


# --- the run -----------------------------------------------------------------------------------------------------

def launch(cfg: RunConfig, resume: Path | None = None, dry: bool = False, force: bool = False,
           command: str = "lorasp launch") -> int:
    """Check everything, start or join Ray, run the trainer. `command` is this command line, for the resume hint.
    The inputs (lorasp_dist.inputs.check_inputs) are checked by the caller, before it imports this module."""
    plan = make_plan(cfg, resume)
    if dry:
        return dry_run(plan)
    if not force:
        check_memory(plan.cfg)  # before Ray starts: memory.gpu_mem and memory.host_mem need no cluster
    if plan.cfg.launcher.address is None:
        isolate_local_instance()  # loopback only and token auth; before Ray is imported, which reads them then

    import ray

    from launcher.cluster import check_resources, check_shared_storage, connect, gpu_memory
    from lorasp_dist.engine.train import preflight

    # The run directory's lock, held to the end: a run continued with --resume is locked before anything else, so a
    # second launch on it stops at once; a new one is created (exclusively) and locked once every check has passed, so
    # a launch refused for bad input leaves nothing behind.
    with ExitStack() as held, StopRelay() as stop:  # a stop request while we start up is delivered once we run
        if resume is not None:
            held.enter_context(RunLock(plan.run_dir))
        connect(plan.cfg, release=held.close)
        stop.install()
        try:
            check_resources(plan.cfg)
            if not force and plan.cfg.launcher.gpus_per_worker and plan.cfg.memory.gpu_mem is None:
                check_memory(plan.cfg, gpu_memory(plan.cfg))  # against the GPUs' size, read on the cluster
            check_shared_storage(plan.storage)
            preflight(plan.cfg)  # data, tokenizer, base: bad input ends here, not in max_failures restarts of the group
            if resume is None:
                _create(plan)
                held.enter_context(RunLock(plan.run_dir))
            return _run(plan, command, stop)
        finally:
            ray.shutdown()


def _create(plan: LaunchPlan) -> None:
    """A new run directory, ours alone (two launches of one name: the second stops here), a run's from the start."""
    try:
        plan.run_dir.mkdir(parents=True)
    except FileExistsError:
        raise ConfigError(_taken(plan.run_dir)) from None
    atomic_write_text(plan.run_dir / "config.yaml", plan.cfg.to_yaml())


def _run(plan: LaunchPlan, command: str, stop: StopRelay) -> int:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.cluster import worker_resources
    from launcher.logs import TeeOutput
    from launcher.worker import train_worker
    from lorasp_dist.engine.train import EXIT_NONFINITE, EXIT_STOPPED, NONFINITE_FILE, STOP_FILE

    cfg, lc, run_dir = plan.cfg, plan.cfg.launcher, plan.run_dir
    # Ray Train would turn each print on a worker into a log record that reaches the console twice; the rank logs
    # (launcher/logs.py) already collect and tag every line. Ray propagates this variable to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's preemption watcher (one more actor process per worker group, polling for drained nodes) only hands
    # the train function a notice that it never reads: SLURM's signals and the STOP file stop a run here.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stale request must not stop this run at its first step
    # Ray Train's checkpoint list, left by lorasp versions that reported checkpoints to Ray: Ray refuses to start when
    # a listed directory is gone (set aside, pruned) or the list was written by another Ray version.
    (run_dir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    summary = run_dir / "summary.json"  # written by the engine when it finishes, never when it stops
    summary.unlink(missing_ok=True)  # (an mtime test would trust the clocks of other nodes)
    nonfinite = run_dir / NONFINITE_FILE  # written by the engine when it stops on NaN/inf
    nonfinite.unlink(missing_ok=True)
    trainer = TorchTrainer(
        train_worker,
        # secrets apart, in the object store: Ray Train keeps (and shows) the config it is given
        train_loop_config={"config": cfg.redacted(), "secrets": ray.put(cfg.secret_env()), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend=lc.torch_backend),
        scaling_config=ScalingConfig(
            num_workers=lc.num_workers, use_gpu=lc.gpus_per_worker > 0, resources_per_worker=worker_resources(cfg)
        ),
        run_config=RunConfig(
            name=plan.name,
            storage_path=str(plan.storage),
            failure_config=FailureConfig(max_failures=lc.max_failures),
            # Ray Train's INFO lines would bury the ranks' own progress lines; its warnings and errors still reach
            # the console, and all of it its log files in the session dir.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    stop.arm(run_dir / STOP_FILE)
    with TeeOutput(run_dir / "logs" / "driver.log", tag_console=False):
        print(f"[lorasp] run dir: {run_dir}\n{describe(plan)}", flush=True)
        try:
            _fit(trainer)
        except TrainingFailedError as e:
            print(f"[lorasp] training failed ({lc.max_failures} restarts allowed): {e}", file=sys.stderr)
            print(f"[lorasp] logs of every rank: {run_dir / 'logs'}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        finally:  # a stop asked of this launch and never taken up (an abort, a failure, the last step) is spent
            stop.disarm()
        if summary.is_file():
            output = "model" if "model" in json.loads(summary.read_text()) else "adapter"  # variant=full: model
            print(f"[lorasp] run dir: {run_dir}")
            print(f"[lorasp] {output}: {run_dir / output}")
            print(f"[lorasp] memory report: {run_dir / 'memory_report.md'}", flush=True)
            return EXIT_OK
        if nonfinite.is_file():  # the ranks returned on purpose: not a failure for Ray to retry
            print(f"[lorasp] {json.loads(nonfinite.read_text())['message']}", file=sys.stderr, flush=True)
            return EXIT_NONFINITE
        step = ckpt.newest_valid(run_dir).step or 0
        why = f" ({stop.signal_name})" if stop.signal_name else ""
        print(f"[lorasp] stopped at step {step}{why}; resume with: {command} --resume {run_dir}", flush=True)
        return EXIT_STOPPED


def _fit(trainer) -> None:
    """`trainer.fit()` on a helper thread. On the main thread Ray Train installs its own SIGINT handler, which aborts
    the run without a checkpoint; this way Ctrl-C stays with StopRelay. fit's exception, if any, is raised here."""
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the main thread
            failure.append(e)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # signal handlers run on the main thread, between these waits
    if failure:
        raise failure[0]
