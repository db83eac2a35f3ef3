"""`lorasp launch` end to end: a real local Ray instance, a second Ray cluster started by `ray start`, 2 CPU workers
running real DeepSpeed ZeRO-3 on the tiny 4-bit base. No mocks: ranks are killed and signalled for real.

A test that needs a Ray instance of its own gets it from `lorasp launch` (ray_env); the others join the session's
cluster (ray_cluster, tests/conftest.py). tests/ray_cluster.py says how Ray processes are kept apart and stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import torch
from conftest import EXACT
from faults import record
from ports import free_ports
from ray_cluster import RAY, RayEnv, RayHead, ray_pids, stop_pids, wait_for
from safetensors.torch import load_file
from test_engine import check_trains_and_partitions
from test_secrets import PROBE, SECRET, holders

from lorasp_dist.engine import checkpoint as ckpt
from lorasp_dist.engine.run_dir import LOCK_FILE, RunLock

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
BAD_INPUT_S = 30
# Bad input that needs no cluster: an error before Ray starts, in under 5 s of the process's CPU. Not of wall time:
# beside the suite's other runs and the SLURM jobs' Ray heads coming up, a check that takes 0.3-0.7 s on an idle
# machine waited up to 7 s for a core.
EARLY_ERROR_S = 5
PROGRESS = re.compile(r"\[lorasp\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d step (?P<step>\d+)/\d+ .*")


# --- helpers -----------------------------------------------------------------------------------------------------

def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorasp_dist", "launch", str(TINY), *args]


def launch(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run(launch_cmd(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    proc.elapsed = time.time() - t0
    return proc


def steps_logged(run_dir: Path, rank: int = 0) -> list[int]:
    lines = (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def past_step_3(run_dir: Path):
    """A wait_for predicate: the run has logged 3 steps (mid-run: training under way, far from its end)."""
    return lambda: (run_dir / "metrics" / "rank0.jsonl").is_file() and len(steps_logged(run_dir)) >= 3


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def adapter_gap(a: Path, b: Path) -> float:
    wa, wb = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def steps_redone(run_dir: Path) -> int:
    return sum(n - 1 for n in Counter(steps_logged(run_dir)).values())


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --- the main job ------------------------------------------------------------------------------------------------

class LocalRay(NamedTuple):
    """What a launch's own Ray instance showed while it trained: the TCP sockets of the launcher and of every process
    it started, the ports of torch's rendezvous store in rank 0, and the GCS's environment."""
    sockets: list[tuple[str, int, str]]
    store: set[int]
    gcs_env: dict[str, str]


@pytest.fixture(scope="module")
def main_job(ray_cluster, seed_tiny, tmp_path_factory):
    """The README's main job, run once for the tests that read it: examples/tiny.yaml (20 steps, LoRA-SP, ZeRO-3, 2 CPU
    workers) on a new local Ray, while another Ray instance runs on the host (the session's cluster, as a user's own
    `ray start` would be): the launch must keep to its own. Its ranks are also handed a secret-looking `env` value,
    and a probe on their PYTHONPATH (tests/test_secrets.py) reports what they saw. Returns the output dir, the
    launch, the probe's reports, the files of Ray's session (logs and state) that hold the secret, read before the
    session is removed, and the local instance as seen at step 3 (LocalRay)."""
    out, probe, seen = (tmp_path_factory.mktemp(name) for name in ("main", "probe", "seen"))
    seed_tiny(out)
    (probe / "sitecustomize.py").write_text(PROBE)
    run = out / "tiny"
    with RayEnv() as env:
        env = {**env, "PYTHONPATH": str(probe), "LORASP_PROBE_OUT": str(seen)}
        t0 = time.time()
        proc = subprocess.Popen(launch_cmd(f"train.output_dir={out}", "train.run_name=tiny",
                                           f"env.LORASP_PROBE_TOKEN={SECRET}"),
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(past_step_3(run), "step 3", proc)
            ray_procs = psutil.Process(proc.pid).children(recursive=True)
            local = LocalRay(listening([psutil.Process(proc.pid), *ray_procs]),
                             torch_store_ports(int((run / "pids" / "rank0").read_text())),
                             next(p for p in ray_procs if p.name() == "gcs_server").environ())
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        done.elapsed = time.time() - t0
        ray_files = holders(Path(env["RAY_TMPDIR"]), SECRET)
    return out, done, seen, ray_files, local


@pytest.mark.slow
def test_launch_tiny_on_local_ray(main_job):
    """The README's main job: examples/tiny.yaml (20 steps, LoRA-SP, ZeRO-3, 2 CPU workers) on a new local Ray."""
    tiny_out, proc, _, _, local = main_job
    print(f"launch took {proc.elapsed:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = tiny_out / "tiny"
    assert "Started a local Ray instance" in proc.stdout + proc.stderr
    # The local Ray instance listens on 127.0.0.1 only, with token authentication set by the launcher itself; the one
    # exception is torch's rendezvous store on rank 0.
    print(f"listening: {sorted(set(local.sockets))}")
    wide = [(ip, port, name) for ip, port, name in local.sockets if ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert local.sockets and len(local.store) <= 1 and all(port in local.store for _, port, _ in wide), wide
    assert local.gcs_env.get("RAY_AUTH_MODE") == "token" and len(local.gcs_env.get("RAY_AUTH_TOKEN", "")) >= 32
    assert f"[lorasp] adapter: {run / 'adapter'}" in proc.stdout
    assert f"[lorasp] memory report: {run / 'memory_report.md'}" in proc.stdout
    assert (run / "memory_report.md").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()

    loss = losses(run)
    assert sorted(loss) == list(range(1, 21))
    print(f"loss {loss[1]:.4f} -> {loss[20]:.4f}")
    assert loss[20] < loss[1]
    # plain zero3 with whole-layer fetches (the default): the engine test's checks (tests/test_engine.py)
    check_trains_and_partitions(run, "zero3", 20)
    for rank in (0, 1):
        assert steps_logged(run, rank) == list(range(1, 21))  # ray.train.report keeps rank 0's only: files keep all
        assert (run / "memory" / f"rank{rank}.jsonl").is_file()
        log = (run / "logs" / f"rank{rank}.log").read_text().splitlines()
        assert log and all(line.startswith(f"[rank {rank}] ") for line in log)
        assert any("[lorasp] rank" in line for line in log)
    assert "[lorasp] run dir" in (run / "logs" / "driver.log").read_text()
    # the engine owns retention (train.keep_last=2); Ray Train holds no checkpoint of its own, and the lock is released
    assert checkpoint_names(run) == ["step-000010", "step-000020"]
    assert not (run / "checkpoint_manager_snapshot.json").exists() and not (run / LOCK_FILE).exists()
    assert json.loads((run / "summary.json").read_text())["adapter"] == str(run / "adapter")

    # Progress while it trains: a line every train.log_every (1) steps in rank 0's log and on the console, none from
    # rank 1; and none of Ray's noise (a state-API warning a second without ray[default], a repr of every report) or
    # bitsandbytes' (on an AVX512-BF16 CPU, a warning from every rank about a hub kernel that is never used).
    progress = [PROGRESS.search(line) for line in (run / "logs" / "rank0.log").read_text().splitlines()]
    assert [int(m["step"]) for m in progress if m] == list(range(1, 21))
    assert all("loss " in m[0] and "tok/s" in m[0] and "eta " in m[0] and "host_rss " in m[0] for m in progress if m)
    assert len(PROGRESS.findall(proc.stdout)) == 20
    assert not PROGRESS.search((run / "logs" / "rank1.log").read_text())
    # the data's summary line: the launcher's, before Ray starts, and rank 0's; rank 1 builds the same rows silently
    assert (run / "logs" / "rank0.log").read_text().count("[lorasp] data: ") == 1
    assert "[lorasp] data: " not in (run / "logs" / "rank1.log").read_text()
    # on stdout with the progress lines, so the console keeps rank 0's order: its data line before its first step's
    lines = proc.stdout.splitlines()
    data_at = [i for i, line in enumerate(lines) if "[lorasp] data: " in line]
    assert len(data_at) == 2 and data_at[1] < next(i for i, line in enumerate(lines) if PROGRESS.search(line))
    console = proc.stdout + proc.stderr
    assert "PlacementGroupCleaner" not in console and "TrainingReport(" not in console
    assert "kernels-community" not in console

    # The adapter knows its base (the preset's cached synthetic checkpoint) and carries its tokenizer, so eval
    # needs nothing but the run directory.
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_out / ".cache" / "base-tiny-v1024")
    assert (run / "adapter" / "tokenizer_config.json").is_file()
    data = tiny_out / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in [("Hi", "Hi"), ("Bye", "Bye")]))
    scored = subprocess.run([sys.executable, "-m", "lorasp_dist", "eval", str(run), "--data", str(data)],
                            cwd=tiny_out, capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout)
    assert result["metric"] == "exact_match" and result["n"] == 2 and 0 <= result["value"] <= 1


@pytest.mark.slow
def test_ranks_get_a_secret_no_file_holds(main_job):
    """A secret-looking `env` value stays out of Ray's runtime_env and out of every file, yet every rank gets it."""
    out, proc, seen, ray_files, _ = main_job
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = out / "tiny"
    assert "LORASP_PROBE_TOKEN: <redacted>" in (run / "config.yaml").read_text()
    want = hashlib.sha256(SECRET.encode()).hexdigest()
    for rank in (0, 1):
        pid = (run / "pids" / f"rank{rank}").read_text().strip()
        report = json.loads((seen / pid).read_text())
        assert report == {"initial": False, "sha256": want}, (rank, report)  # set by the engine, not by Ray
    assert SECRET not in proc.stdout + proc.stderr
    assert holders(run, SECRET) == []
    assert ray_files == []  # Ray's session logs and state


# --- an existing cluster, faults and stops -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed(ray_cluster, seed_tiny, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict, int, int]:
    """A launch through `--address` to the session's cluster with launcher.max_failures=1 and EXACT's settings.
    While it holds its run directory, two other runs try it: `lorasp launch --resume` of it and a `lorasp train` of
    the same name. Rank 1 is killed after the step-5 checkpoint, and its successor after the step-10 one. Returns the
    run directory, the launch, the rivals and the steps logged at each kill."""
    head, env = ray_cluster
    out = seed_tiny(tmp_path_factory.mktemp("killed"))
    run = out / "killed"
    args = (f"train.output_dir={out}", "train.run_name=killed", *EXACT, "launcher.max_failures=1")
    t0 = time.time()
    proc = subprocess.Popen(launch_cmd(*args, "--address", head.address), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # the lock is taken before the workers start: the rivals come while this run loads and trains
        wait_for((run / LOCK_FILE).is_file, "the run's lock", proc)
        rivals = {
            "launch": launch(env, *args, "--address", head.address, "--resume", str(run), timeout=120),
            "train": subprocess.run([sys.executable, "-m", "lorasp_dist", "train", str(TINY), *args], env=env,
                                    cwd=REPO, capture_output=True, text=True, timeout=300),
        }
        assert proc.poll() is None, "the run ended before its rivals came: the test proves nothing"
        wait_for((run / "checkpoints" / "step-000005" / "manifest.json").is_file, "the step-5 checkpoint", proc)
        victim = int((run / "pids" / "rank1").read_text())
        os.kill(victim, signal.SIGKILL)
        killed_after = max(steps_logged(run))
        # the restarted group's checkpoint, 5 steps before the run's end
        wait_for((run / "checkpoints" / "step-000010" / "manifest.json").is_file, "the step-10 checkpoint", proc)
        second = int((run / "pids" / "rank1").read_text())
        os.kill(second, signal.SIGKILL)
        stopped_at = max(steps_logged(run))
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"killed rank 1 (pid {victim}) after step {killed_after}, its successor (pid {second}) after step "
          f"{stopped_at}; run took {time.time() - t0:.0f} s")
    assert second != victim  # Ray Train started a new group
    return run, subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), rivals, killed_after, stopped_at


@pytest.mark.slow
def test_killed_rank_is_restarted_then_fails_beyond_max_failures(killed, uninterrupted):
    """launcher.max_failures=1. Rank 1 killed after the step-5 checkpoint: Ray Train restarts the group, which
    resumes from it and trains as an uninterrupted run does (its step-10 checkpoint is that run's). Killed again: the
    restarts are spent, the launch exits 1 naming the rank logs, and the checkpoints it wrote stay intact."""
    run, proc, _, killed_after, stopped_at = killed
    out = proc.stdout
    assert proc.returncode == 1, out[-6000:]
    # joined the session's cluster, and none of Ray's noise (a state-API warning a second, a repr of every report)
    assert "Connected to Ray cluster" in out and "Started a local Ray instance" not in out
    assert "PlacementGroupCleaner" not in out and "TrainingReport(" not in out
    assert "[lorasp] training failed (1 restarts allowed)" in out
    assert f"[lorasp] logs of every rank: {run / 'logs'}" in out

    resumed = (run / "logs" / "rank0.log").read_text()
    assert "resume: auto" in resumed and "[lorasp] resumed from" in resumed
    resumed_at = int(re.search(r"\[lorasp\] resumed from \S+ at step (\d+)", resumed)[1])
    redone = killed_after - resumed_at
    print(f"steps redone after the restart: {redone}")
    assert resumed_at == 5 and redone <= 5  # at most one checkpoint interval (train.save_every)
    for rank in (0, 1):  # the records of the steps redone were dropped on resuming: every step once
        logged = steps_logged(run, rank)
        assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 10, logged
        assert (run / "logs" / f"rank{rank}.log").read_text().startswith(f"[rank {rank}] ")
    assert checkpoint_names(run) == ["step-000005", "step-000010"]
    intact = all(ckpt.verify(ckpt.step_dir(run, s))[0] for s in (5, 10))
    assert intact
    # the restarted group's step-10 LoRA-SP state (every value and mask) and losses are the uninterrupted run's
    mine, theirs = (load_file(ckpt.step_dir(r, 10) / "lorasp.safetensors") for r in (run, uninterrupted))
    assert mine.keys() == theirs.keys()
    gap = max((mine[k].double() - theirs[k].double()).abs().max().item() for k in mine)
    print(f"max |killed - uninterrupted| over the step-10 LoRA-SP state: {gap:.3g}")
    assert gap <= 1e-5
    reference = losses(uninterrupted)
    for step, loss in losses(run).items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step
    record("rank kill", entry="lorasp launch", exit_code=None, steps_lost=redone, data_lost=gap > 1e-5 or not intact,
           outcome=f"SIGKILL to rank 1 after step {killed_after}: Ray Train restarted the group from the newest "
                   "checkpoint; its next checkpoint matches an uninterrupted run's")
    record("rank kill beyond launcher.max_failures", entry="lorasp launch", exit_code=proc.returncode,
           steps_lost=stopped_at - 10, data_lost=not intact,
           outcome="the restarts spent: exit 1, one line naming the rank logs; the checkpoints written stay intact "
                   "(resume with --resume)")


@pytest.mark.slow
def test_mask_redraws_under_lorasp_launch(ray_cluster, seed_tiny, tmp_path):
    """lorasp.resample_every through the product's entry point: `lorasp launch` (Ray Train, 2 ranks, ZeRO-3) redraws
    every mask on schedule on both ranks, and the whole of B moves (with fixed masks its frozen half stays zero).
    What a redraw does to each rank's partitions and optimizer state: tests/test_resample_zero3.py."""
    head, env = ray_cluster
    out = seed_tiny(tmp_path)
    proc = launch(env, f"train.output_dir={out}", "train.run_name=redrawn", "train.max_steps=8", "train.eval_every=0",
                  "lorasp.resample_every=2", "--address", head.address)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = out / "redrawn"
    for rank in (0, 1):  # redrawn before steps 3, 5 and 7, each a phase of its own in the memory report
        records = map(json.loads, (run / "memory" / f"rank{rank}.jsonl").read_text().splitlines())
        assert [r["step"] for r in records if r["phase"] == "redraw"] == [3, 5, 7]
    assert steps_logged(run) == list(range(1, 9))
    b = [t for k, t in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    zero = sum((t == 0).sum().item() for t in b) / sum(t.numel() for t in b)
    assert 0 < len(b) and zero < 0.45, zero  # a fixed mask leaves 50% of B at its zero start


@pytest.mark.slow
def test_a_second_run_in_a_run_directory_is_refused(killed):
    """While a run holds its directory, another `lorasp launch --resume` or `lorasp train` of it stops at once."""
    run, _, rivals, _, _ = killed
    for command, proc in rivals.items():
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (command, proc.stdout[-2000:], proc.stderr[-3000:])
        assert err[-1].startswith(f"error: train.run_name = 'killed': {run} is in use by pid "), (command, err[-1:])
        assert "Traceback" not in proc.stderr
    # the run itself saw nothing of them: every step once per rank, its checkpoints whole
    intact = all(steps_logged(run, rank) == list(range(1, len(steps_logged(run, rank)) + 1)) for rank in (0, 1))
    intact &= all(ckpt.verify(ckpt.step_dir(run, s))[0] for s in (5, 10))
    assert intact
    record("concurrent launch", entry="lorasp launch --resume / lorasp train", exit_code=rivals["launch"].returncode,
           steps_lost=steps_redone(run), data_lost=not intact,
           outcome="a second run on a live run directory: one line naming the holder (host, pid), exit 2, "
                   "the running run untouched")


@pytest.mark.slow
def test_resume_refuses_when_every_checkpoint_is_corrupt(uninterrupted, ray_cluster, tiny_out):
    """With every checkpoint of a run corrupt, `--resume` (and its dry run) stops with one line and changes nothing.
    (Past a corrupt newest one, it continues from the one before: the Ctrl-C run below ends that way.)"""
    head, env = ray_cluster
    run = tiny_out / "copy"
    shutil.copytree(uninterrupted, run)
    for step, file in ((5, "rank1.safetensors"), (10, "rank0.safetensors"), (15, "lorasp.safetensors")):
        flip_a_byte(ckpt.step_dir(run, step) / file)
    before = digest(run)
    for dry in ((), ("--dry-run",)):
        proc = launch(env, *EXACT, "--address", head.address, "--resume", str(run), *dry, timeout=120)
        _assert_usage_error(proc, f"train.resume = 'auto': every checkpoint in {run / 'checkpoints'} is corrupt "
                                  "(step-000015: lorasp.safetensors fails its sha256 checksum; step-000010: ")
        assert "set train.restart_if_corrupt=true" in proc.stderr
    assert digest(run) == before


def listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket these processes listen on."""
    found = []
    for p in procs:
        try:
            found += [(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections("tcp") if c.status == "LISTEN"]
        except psutil.NoSuchProcess:
            pass
    return found


def torch_store_ports(pid: int) -> set[int]:
    """Ports of torch.distributed's TCPStore in this rank: it listens on them and, as every rank does, connects to
    its own store. (torch binds the store to every interface and offers no setting for it.)"""
    conns = psutil.Process(pid).net_connections("tcp")
    listens = {c.laddr.port for c in conns if c.status == "LISTEN"}
    return {c.raddr.port for c in conns if c.status == "ESTABLISHED" and c.raddr and c.raddr.port in listens}


def newest_checkpoint_step(run_dir: Path) -> int:
    return ckpt.newest_valid(run_dir).step or 0


@pytest.mark.slow
def test_ctrl_c_checkpoints_a_second_aborts_and_resume_finishes(uninterrupted, ray_cluster, ray_env, tiny_out):
    """One run, stopped twice and finished (SIGUSR1, SLURM's stop, takes the first path: tests/test_slurm.py).
    1. Ctrl-C on `lorasp launch` joined to the session's cluster (`--address`; SIGINT to its whole process group, as
       a terminal sends it): every rank checkpoints, exit 3 and the resume line.
    2. Resumed on a local Ray instance of its own, then Ctrl-C twice once it has saved the next checkpoint: no
       waiting for another; exit 130, and the local Ray instance goes with it.
    3. Its newest checkpoint corrupted (a flipped byte), resumed with train.keep_last=2 on the session's cluster:
       it continues from the checkpoint before, moves the corrupt one to checkpoints/corrupt/ and ends with two
       checkpoints and the adapter of a run never interrupted."""
    head, cluster_env = ray_cluster
    env = {k: v for k, v in ray_env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    run = tiny_out / "interrupted"
    cmd = launch_cmd(f"train.output_dir={tiny_out}", "train.run_name=interrupted", *EXACT)
    proc = subprocess.Popen([*cmd, "--address", head.address], env=cluster_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(past_step_3(run), "step 3", proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped_at = max(steps_logged(run))
    saved = newest_checkpoint_step(run)
    record("SIGINT (Ctrl-C)", entry="lorasp launch (Ray cluster)", exit_code=proc.returncode,
           steps_lost=stopped_at - saved, data_lost=saved != stopped_at,
           outcome=f"checkpoint at step {saved} of {stopped_at} done")
    assert proc.returncode == 3, out[-6000:]
    assert stopped_at < 10 and saved == stopped_at
    resume_line = next(line for line in out.splitlines() if "resume with: " in line)
    assert resume_line.startswith(f"[lorasp] stopped at step {stopped_at} (SIGINT); resume with: ")
    assert resume_line.endswith(f"--resume {run}")
    assert not (run / "STOP").exists() and not (run / "adapter").exists()

    proc = subprocess.Popen([*cmd, "--resume", str(run)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        following = (stopped_at // 5 + 1) * 5  # train.save_every=5: two checkpoints before the abort
        wait_for((ckpt.step_dir(run, following) / "manifest.json").is_file, f"the step-{following} checkpoint", proc)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        out, _ = proc.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    aborted_at = max(steps_logged(run))
    assert proc.returncode == 130, out[-6000:]
    assert "[lorasp] SIGINT again: aborting now, without a checkpoint" in out and took < 60, took
    _, alive = psutil.wait_procs(ray_procs, timeout=30)
    assert not alive, alive
    assert not (run / LOCK_FILE).exists()  # the launcher released its lock on the way out
    newest = newest_checkpoint_step(run)
    assert following <= newest and aborted_at - newest <= 5  # at most one interval (train.save_every) to redo
    flip_a_byte(ckpt.step_dir(run, newest) / "rank1.safetensors")
    before = digest(ckpt.step_dir(run, newest))
    previous = newest_checkpoint_step(run)
    assert stopped_at <= previous < newest
    again = launch(cluster_env, *EXACT, "train.keep_last=2", "--address", head.address, "--resume", str(run))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    joined = again.stdout + again.stderr  # the session's cluster, not a Ray instance of its own
    assert "Connected to Ray cluster" in joined and "Started a local Ray instance" not in joined
    assert f"[lorasp] adapter: {run / 'adapter'}" in again.stdout
    assert (f"step-{newest:06d} is corrupt (rank1.safetensors fails its sha256 checksum): the run continues from "
            f"step-{previous:06d}") in again.stderr
    assert checkpoint_names(run) == [ckpt.CORRUPT, "step-000010", "step-000015"]
    assert digest(run / "checkpoints" / ckpt.CORRUPT / f"step-{newest:06d}") == before  # kept, as it was
    log = (run / "logs" / "rank0.log").read_text()
    assert int(re.findall(r"\[lorasp\] resumed from \S+ at step (\d+)", log)[-1]) == previous
    for rank in (0, 1):  # the records of the steps redone were dropped on resuming: every step once
        assert steps_logged(run, rank) == list(range(1, 16))
    gap = adapter_gap(run, uninterrupted)
    print(f"stopped at step {stopped_at}, aborted at {aborted_at}; step {newest} corrupted, resumed from {previous}; "
          f"max |resumed - uninterrupted| over the adapter: {gap:.3g}")
    record("second Ctrl-C (abort)", entry="lorasp launch (local Ray)", exit_code=130,
           steps_lost=aborted_at - newest, data_lost=gap > 1e-5,
           outcome=f"aborted at step {aborted_at} without a checkpoint, the lock released; --resume finished the run, "
                   "its adapter matching an uninterrupted run")
    intact = all(ckpt.verify(ckpt.step_dir(run, s))[0] for s in (10, 15))
    record("corrupt newest checkpoint", entry="lorasp launch --resume", exit_code=again.returncode,
           steps_lost=newest - previous, data_lost=not intact or gap > 1e-5,
           outcome="resumed from the previous checkpoint, the corrupt one moved to checkpoints/corrupt/, "
                   "keep_last honoured; the adapter matches an uninterrupted run")
    assert gap <= 1e-5


@pytest.mark.slow
def test_sigterm_stops_torchrun_ranks_with_a_checkpoint(tiny_out):
    """`lorasp train` under torchrun: SIGTERM to the ranks (as `kill` or `scancel` sends it) -> every rank
    checkpoints at the next step boundary and exits 3, which torchrun reports."""
    run = tiny_out / "torchrun"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "lorasp_dist", "train", str(TINY),
           f"train.output_dir={tiny_out}", "train.run_name=torchrun", "train.max_steps=40", "train.save_every=10",
           "train.eval_every=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(past_step_3(run), "step 3", proc)
        for rank in psutil.Process(proc.pid).children():
            rank.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = max(steps_logged(run))
    saved = newest_checkpoint_step(run)
    codes = sorted({int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", out)})
    record("SIGTERM", entry="lorasp train (torchrun)", exit_code=codes[0] if len(codes) == 1 else None,
           steps_lost=stopped_at - saved, data_lost=saved != stopped_at,
           outcome=f"every rank exited {codes}, checkpoint at step {saved} of {stopped_at} done")
    assert codes == [3], out[-6000:]
    assert saved == stopped_at
    assert f"[lorasp] stop requested: checkpoint saved at step {stopped_at}" in out
    assert "train.run_name=torchrun train.resume=auto" in out


# --- bad input: one line, exit 2, in seconds ---------------------------------------------------------------------

def _assert_usage_error(proc: subprocess.CompletedProcess, message: str) -> None:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert err and err[-1].startswith("error: ") and message in err[-1], err[-1:]
    assert "Traceback" not in proc.stderr
    assert proc.elapsed < BAD_INPUT_S


def test_unreachable_address(ray_env, tmp_path):
    proc = launch(ray_env, f"train.output_dir={tmp_path}", "--address", "127.0.0.1:1", timeout=120)
    _assert_usage_error(proc, "launcher.address = '127.0.0.1:1': no Ray cluster answers there")


def test_missing_config(ray_env, tmp_path):
    cmd = [sys.executable, "-m", "lorasp_dist", "launch", str(tmp_path / "nope.yaml")]
    t0 = time.time()
    proc = subprocess.run(cmd, env=ray_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    proc.elapsed = time.time() - t0
    _assert_usage_error(proc, f"config file '{tmp_path / 'nope.yaml'}': not found")


def test_existing_run_dir_needs_resume(ray_env, tmp_path):
    (tmp_path / "taken").mkdir()
    proc = launch(ray_env, f"train.output_dir={tmp_path}", "train.run_name=taken", timeout=120)
    _assert_usage_error(proc, f"continue it with --resume {tmp_path / 'taken'}")
    proc = launch(ray_env, f"train.output_dir={tmp_path}", "--resume", str(tmp_path / "gone"), timeout=120)
    _assert_usage_error(proc, "--resume")


def test_resume_needs_a_run_directory_that_is_free(ray_env, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("not a run\n")
    proc = launch(ray_env, "--resume", str(notes), timeout=120)
    _assert_usage_error(proc, f"--resume '{notes}': not a run directory (no config.yaml or checkpoints/ in it)")
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("notes"), Path("notes/todo.txt")]

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.yaml").write_text("{}\n")
    with RunLock(busy):  # a live run (this process) holds it
        proc = launch(ray_env, "--resume", str(busy), timeout=120)
    _assert_usage_error(proc, f"error: train.run_name = 'busy': {busy} is in use by pid {os.getpid()} on ")
    assert sorted(p.name for p in busy.iterdir()) == ["config.yaml"]


def _seal(run_dir: Path, step: int, world_size: int = 2) -> None:
    """A real (tiny) checkpoint through the engine's own writer: what --resume reads before any worker starts."""
    tmp = ckpt.tmp_dir(run_dir, step)
    tmp.mkdir(parents=True)
    for name in ("lorasp", *(f"rank{r}" for r in range(world_size))):
        ckpt.save_state_file(tmp / f"{name}.safetensors", {"state": torch.full((4,), float(step))})
    ckpt.seal(tmp, ckpt.step_dir(run_dir, step), {"step": step, "sample_pos": 0, "world_size": world_size})


def test_dry_run_resumes_past_a_broken_manifest(ray_env, tmp_path):
    """The newest manifest is truncated (a requeued SLURM job reads the same): the launcher falls back to step 10."""
    run = tmp_path / "run"
    for step in (10, 20):
        _seal(run, step)
    manifest = ckpt.step_dir(run, 20) / ckpt.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])
    before = digest(run)
    proc = launch(ray_env, "--resume", str(run), "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-000020 is corrupt (unreadable manifest (" in proc.stderr
    assert "the run continues from step-000010" in proc.stderr and "Traceback" not in proc.stderr
    assert f"run dir:  {run}" in proc.stdout
    proc = launch(ray_env, "--resume", str(run), "--num-workers", "4", "--dry-run", timeout=120)
    _assert_usage_error(proc, f"launcher.num_workers = 4: {ckpt.step_dir(run, 10)} was written by 2 ranks")
    assert digest(run) == before  # a dry run moves nothing


@pytest.mark.slow
def test_cluster_too_small(ray_cluster, tmp_path):
    head, env = ray_cluster
    proc = launch(env, f"train.output_dir={tmp_path}", "--num-workers", "64", "--address", head.address, timeout=120)
    _assert_usage_error(proc, "launcher.num_workers = 64: needs 64 CPU")


def test_memory_plan_refuses_before_ray_starts(ray_env, tmp_path):
    """memory.gpu_mem and memory.host_mem need no cluster: a run they cannot hold (with headroom) ends in one line
    before Ray starts. The address answers nothing, so reaching it would be a different error."""
    address = ["--address", "127.0.0.1:1"]
    proc = launch(ray_env, f"train.output_dir={tmp_path}", "memory.host_mem=1.5GiB", *address, timeout=120)
    _assert_usage_error(proc, "the memory plan does not fit: needs")
    assert "GiB headroom, has 1.5 GiB" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()) and not ray_pids(ray_env["RAY_TMPDIR"])
    proc = launch(ray_env, f"train.output_dir={tmp_path}", "memory.host_mem=1.5GiB", "--force", *address,
                  timeout=120)
    _assert_usage_error(proc, "launcher.address = '127.0.0.1:1'")  # --force: on to the cluster


EARLY_ERRORS = [
    (["data.path=/nonexistent.jsonl"], "data.path = '/nonexistent.jsonl': not found"),
    (["model.path=/nonexistent"], "model.path = '/nonexistent': not found"),
    (["memory.gpu_mem=lots"], "memory.gpu_mem = 'lots': not a memory size"),
    (["data.path={tmp}/qa.jsonl"], "data.prompt_column = 'prompt': not a column of"),
    (["data.tokenizer={tmp}/big-tokenizer"], "tokens do not fit the model's vocabulary of 1024"),
    (["data.seq_len=1024"], "data.seq_len = 1024: longer than the model's context, max_position_embeddings = 512"),
]


def test_bad_input_fails_before_ray_starts(ray_env, tmp_path):
    """validate, launch --dry-run and launch: one line, exit 2, in under 5 CPU-s, and no Ray session was started."""
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q?", "answer": "a."}) + "\n")
    (tmp_path / "big-tokenizer").mkdir()
    vocab = {f"t{i}": i for i in range(2000)}
    (tmp_path / "big-tokenizer" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    for overrides, message in EARLY_ERRORS:
        overrides = [o.format(tmp=tmp_path) for o in overrides]
        for flags in (["validate"], ["launch", "--dry-run"], ["launch"]):
            cmd = [sys.executable, "-m", "lorasp_dist", *flags, str(TINY), f"train.output_dir={tmp_path}", *overrides]
            before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
            proc = subprocess.run(cmd, env=ray_env, cwd=REPO, capture_output=True, text=True, timeout=120)
            after, proc.elapsed = resource.getrusage(resource.RUSAGE_CHILDREN), time.time() - t0
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            print(f"{' '.join(flags)} {' '.join(overrides)}: {cpu:.1f} CPU-s, {proc.elapsed:.1f} s")
            _assert_usage_error(proc, message)
            assert cpu < EARLY_ERROR_S, (flags, overrides, cpu)
    assert not list(Path(ray_env["RAY_TMPDIR"]).rglob("session_*")) and not ray_pids(ray_env["RAY_TMPDIR"])


def test_connect_deadline_bounds_only_the_wait_for_an_answer():
    """The watchdog on joining a cluster ends a launch that no GCS answers, and spares one whose GCS answered but
    whose driver registers slowly: CI once saw "Connected to Ray cluster", then the 20-s error, on a loaded host."""
    code = ("import sys, time\nfrom launcher.cluster import _deadline\n"
            "with _deadline(0.3, 'no answer', answered=lambda: sys.argv[1] == 'yes'):\n    time.sleep(1.5)\n"
            "print('through')")
    for answered, rc, out in (("yes", 0, "through"), ("no", 2, "")):
        proc = subprocess.run([sys.executable, "-c", code, answered], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert (proc.returncode, proc.stdout.strip()) == (rc, out), proc.stderr[-2000:]
    assert proc.stderr.strip().endswith("error: no answer")


def test_a_launch_no_cluster_answers_leaves_its_run_unlocked(tmp_path):
    """`lorasp launch --resume` locks the run before joining the cluster; the watchdog's exit skips every `with`, so
    it lets the lock go first, or every later start of the run (a requeue on another host) would find it taken."""
    code = ("import sys, time\nfrom contextlib import ExitStack\nfrom pathlib import Path\n"
            "from launcher.cluster import _deadline\nfrom lorasp_dist.engine.run_dir import RunLock\n"
            "held = ExitStack()\nheld.enter_context(RunLock(Path(sys.argv[1])))\n"
            "with _deadline(0.3, 'no answer', answered=lambda: False, release=held.close):\n    time.sleep(1.5)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: no answer"), proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_dry_run_starts_nothing(ray_env, tmp_path):
    proc = launch(ray_env, "--dry-run", f"train.output_dir={tmp_path}", "train.run_name=dry", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# placement" in proc.stdout and "2 Ray Train workers x (1 CPU)" in proc.stdout
    assert "run_name: dry" in proc.stdout and "# memory plan" in proc.stdout
    assert not (tmp_path / "dry").exists()
    assert not ray_pids(ray_env["RAY_TMPDIR"])
    # NCCL puts one rank on a GPU: ranks that share one are given gloo
    for share, backend in (("1", "nccl"), ("0.5", "gloo")):
        proc = launch(ray_env, "--dry-run", f"launcher.gpus_per_worker={share}", timeout=120)
        assert f"x (1 CPU, {share} GPU), torch backend {backend}" in proc.stdout, proc.stderr[-3000:]


def _can_hide_a_directory() -> bool:
    """A node that does not see the storage path: a private mount namespace with a tmpfs over it (needs root)."""
    probe = tempfile.mkdtemp(prefix="lr-probe-", dir="/tmp")
    try:
        cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {probe}"]
        return shutil.which("unshare") is not None and subprocess.run(cmd, capture_output=True).returncode == 0
    finally:
        os.rmdir(probe)


@pytest.mark.slow
@pytest.mark.skipif(not _can_hide_a_directory(), reason="needs unshare + mount (root) for a node with its own disk")
def test_two_nodes_refuse_unshared_storage(ray_env, tmp_path):
    """A real 2-node cluster on loopback whose second node has its own (empty) view of the storage path."""
    storage = Path(ray_env["RAY_TMPDIR"]) / "store"
    storage.mkdir()
    head, node, log = RayHead(ray_env, cpus=1), None, storage.parent / "node2.log"
    try:
        (agent,) = free_ports(1)
        with log.open("w") as out:
            node = subprocess.Popen(
                ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {storage} && exec {RAY} start --block "
                 f"--address {head.address} --node-ip-address 127.0.0.2 --num-cpus 1 --temp-dir "
                 f"{storage.parent}/node2 --dashboard-agent-listen-port {agent} --disable-usage-stats "
                 f"--object-store-memory {256 * 2**20}"],
                env=ray_env, stdout=out, stderr=subprocess.STDOUT,
            )
        # printed once the node's raylet is registered with the head: the cluster has its two nodes
        wait_for(lambda: "Ray runtime started" in log.read_text(), "the second node to join", node, timeout=120)
        proc = launch(ray_env, f"launcher.storage_path={storage}", "--address", head.address, timeout=120)
        _assert_usage_error(proc, f"launcher.storage_path = '{storage}': not shared by the 2 nodes")
        assert "127.0.0.2" in proc.stderr
        print(f"refused in {proc.elapsed:.1f} s")
    finally:
        if node is not None:  # the node first: once the head is gone, a node's shutdown waits for it
            stop_pids([node.pid])
            node.wait(timeout=10)
        head.stop()


def test_resume_before_the_first_checkpoint_keeps_the_warm_start(tmp_path, monkeypatch):
    """A run that began from train.resume=CHECKPOINT and is resumed (--resume, a requeue) before its own first
    checkpoint must start from that checkpoint again, not from the bare base; once it has its own, from those. The
    path reaches the workers absolute: Ray Train runs them in another directory."""
    from launcher.ray_launch import make_plan
    from lorasp_dist.config import load_config

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    cfg = load_config(TINY, ["train.resume=warm/step-000004"])
    warm = str(tmp_path / "warm" / "step-000004")
    assert make_plan(cfg, resume=run).cfg.train.resume == warm
    assert make_plan(load_config(TINY), resume=run).cfg.train.resume == "auto"
    tmp = ckpt.tmp_dir(run, 2)  # the run's own first checkpoint (the tiny config has 2 workers)
    tmp.mkdir(parents=True)
    for name in ("lorasp.safetensors", "rank0.safetensors", "rank1.safetensors"):
        (tmp / name).write_bytes(b"x")
    ckpt.seal(tmp, ckpt.step_dir(run, 2), {"step": 2, "sample_pos": 4, "world_size": 2})
    assert make_plan(cfg, resume=run).cfg.train.resume == "auto"


def test_a_stop_never_taken_up_is_withdrawn(tmp_path):
    """The launcher turns a stop signal into RUN_DIR/STOP for the ranks. When the run ends without taking it up
    (an abort, a failure, a signal after the last step), the request is withdrawn and later signals write nothing:
    a stale STOP would stop the next `lorasp train` of the directory after one step."""
    from launcher.signals import StopRelay

    stop_file = tmp_path / "STOP"
    with StopRelay() as relay:
        relay.arm(stop_file)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop_file.exists() and relay.signal_name == "SIGUSR1"
        relay.disarm()
        assert not stop_file.exists()
        os.kill(os.getpid(), signal.SIGTERM)  # "already stopping": handled, and no file
        assert not stop_file.exists()
