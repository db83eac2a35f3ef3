"""`lorasp slurm` against a real single-node SLURM (munged, slurmctld, slurmd started by tests/slurm_cluster.py).

The jobs that run long (preempted and requeued, cancelled, NaN: tests/slurm_jobs.py) are queued together before the
session's first test and share the node at once; the tests here read what they did.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from faults import record
from slurm_jobs import (
    HALF_CPU,
    JOB_TIMEOUT_S,
    PREEMPT_STEPS,
    SAVE_EVERY,
    lorasp,
    steps_logged,
    submit_job,
    submitted,
)
from test_nonfinite import check_nothing_saved_from_bad_steps

from lorasp_dist.cli import main
from lorasp_dist.engine import checkpoint as ckpt
from lorasp_dist.engine.train import EXIT_STOPPED

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"


def lorasp_here(*args: str) -> subprocess.CompletedProcess:
    """`lorasp ARGS` through its entry point in this process, for a call that only renders or refuses (`--dry-run`, bad
    input): a process of its own would spend a second or more importing. Its exit and output, as a process's."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse, or a command that exits itself
            code = e.code if isinstance(e.code, int) else 1 if e.code else 0
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return subprocess.CompletedProcess(["lorasp", *args], code, out.getvalue(), err.getvalue())


def queued_besides(slurm, slurm_jobs, *states: str) -> list[str]:
    """Jobs in SLURM's queue (in these states, or any) other than the session's long jobs."""
    ours = {job for job, _ in slurm_jobs[0].values()}
    out = slurm.run("squeue", "-h", "-o", "%i", *(["-t", ",".join(states)] if states else []), check=False).stdout
    return [job for job in out.split() if job not in ours]


# --- rendering and bad input: no cluster needed ------------------------------------------------------------------

def test_dry_run_is_a_complete_bash_script(tmp_path):
    out = tmp_path / "runs"
    proc = lorasp_here("slurm", "submit", str(TINY), f"train.output_dir={out}", "train.run_name=r1",
                  "launcher.num_workers=8", "launcher.gpus_per_worker=1", "--nodes", "2", "--gpus-per-node", "a100:4",
                  "--partition", "gpu", "--time", "1-00:00:00", "--account", "proj", "--sbatch=--mem=0", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for option in ("--nodes=2", "--gpus-per-node=a100:4", "--cpus-per-task=4", "--partition=gpu", "--time=1-00:00:00",
                   "--account=proj", "--mem=0", "--signal=B:USR1@120", "--requeue", "--open-mode=append",
                   f"--output={out}/r1.slurm-%j.out", "--job-name=r1"):
        assert f"#SBATCH {option}" in header
    assert len(header) == len({line.split("=")[0] for line in header})  # each option once
    # Every setting and the arguments are filled in: nothing left for the user to edit.
    assert re.search(rf"^LORASP=\$\{{LORASP:-{re.escape(str(Path(sys.executable).with_name('lorasp')))}\}}$",
                     script, re.M)
    assert f"set -- {out}/r1 {TINY} train.output_dir={out} train.run_name=r1" in script
    assert "LORASP_RAY_ARGS=${LORASP_RAY_ARGS:---object-store-memory=268435456}" in script
    assert "LORASP_DASHBOARD_HOST=${LORASP_DASHBOARD_HOST:-127.0.0.1}" in script
    assert not re.search(r"\{\{|@[A-Z_]+@|<[A-Z_]+>", script)
    assert f"EXIT_STOPPED={EXIT_STOPPED} " in script  # the script requeues on the launcher's own exit code
    assert not out.exists()  # a dry run writes nothing
    # Outside a job it refuses to start anything.
    plain = subprocess.run(["bash", "-s"], input=script, text=True, capture_output=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert plain.returncode != 0 and "run this script with sbatch" in plain.stderr
    # The template itself is usable by hand.
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "lorasp.sbatch")]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (("--nodes", "0"), "--nodes = 0: must be 1 or more"),
    (("launcher.gpus_per_worker=1", "--gpus-per-node", "1"), "launcher.num_workers = 2: 1 node(s) x (2 CPUs, 1 GPUs)"),
    (("--gpus-per-node", "many"), "--gpus-per-node = 'many': expected a count or TYPE:COUNT"),
    (("--gpus-per-node", "a100:2\n"), "--gpus-per-node = 'a100:2\n': expected a count or TYPE:COUNT"),
    (("data.path=/nonexistent.jsonl",), "data.path = '/nonexistent.jsonl': not found"),  # before the job queues
])
def test_bad_flags(args, message, tmp_path):
    proc = lorasp_here("slurm", "submit", str(TINY), f"train.output_dir={tmp_path}", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


WHOLE, PORT, HOST = "a whole number >= 1", "a port from 1024 to 65408", "a host name or IP address"
TMP = "an absolute path of letters, digits and _ . + -, no part starting with a dot"


@pytest.mark.parametrize("setting, value, accepted", [
    ("LORASP_RAY_START_TRIES", "0", WHOLE), ("LORASP_RAY_TIMEOUT", "5m", WHOLE),
    ("LORASP_RAY_START_TRIES", "3\ntouch /tmp/lorasp-injected", WHOLE),
    ("LORASP_RAY_PORT", "x[$(touch /tmp/lorasp-injected)]", PORT),  # bash arithmetic would run it
    ("LORASP_RAY_PORT", "80", PORT), ("LORASP_RAY_PORT", "65500", PORT),  # its 127 neighbours pass 65535
    ("LORASP_HEAD_IP", "10.0.0.1;touch /tmp/lorasp-injected", HOST), ("LORASP_DASHBOARD_HOST", "0.0.0.0 --x", HOST),
    ("LORASP_RAY_TMP", "/home/u/../..", TMP), ("LORASP_RAY_TMP", "tmp/ray", TMP), ("LORASP_RAY_TMP", "/", TMP),
])
def test_bad_script_setting_is_refused(setting, value, accepted, tmp_path):
    """The batch script's own settings (environment variables) are checked before it starts anything."""
    env = {**os.environ, "SLURM_JOB_ID": "1", setting: value}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "lorasp.sbatch"), str(tmp_path / "run"), str(TINY)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"error: {setting} = '{value}': give {accepted}" in proc.stdout, proc
    assert list(tmp_path.iterdir()) == [] and not Path("/tmp/lorasp-injected").exists()


# --- values that reach the script: validated, never only quoted -----------------------------------------------------

def injected(marker: Path, head: str = "x") -> str:
    """A value that, written as `#SBATCH --k="v"`, ends the directive and runs a command of its own."""
    return f'{head}"\ntouch {marker}; exit 0 #'


def config_with(tmp_path: Path, section: str, key: str, value: str) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data.setdefault(section, {})[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def injection(field: str, tmp_path: Path) -> list[str]:
    """`lorasp slurm submit` arguments that put an injected command into `field`."""
    bad = injected(tmp_path / "PWNED", "debug" if field == "--partition" else "x")  # debug: the fixture's partition
    out = f"train.output_dir={tmp_path / 'runs'}"
    if field.startswith("--sbatch"):
        return [str(TINY), out, f"--sbatch=--comment={bad}"]
    if field.startswith("--"):
        return [str(TINY), out, field, bad]
    if field == "--resume":
        run = tmp_path / "runs" / "$(touch PWNED)"
        run.mkdir(parents=True)
        return [str(TINY), out, "--resume", str(run)]
    section, key = field.split(".")
    value = f"{tmp_path}/{bad}" if key in ("output_dir", "storage_path") else bad
    return [str(config_with(tmp_path, section, key, value)), *([out] if key != "output_dir" else [])]


FIELDS = ["--partition", "--time", "--account", "--sbatch", "train.run_name", "train.output_dir",
          "launcher.storage_path", "launcher.dashboard_host"]


@pytest.mark.parametrize("field", FIELDS)
def test_injected_value_is_refused(field, tmp_path):
    proc = lorasp_here("slurm", "submit", *injection(field, tmp_path), "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    # what is accepted: the script's own rule, or for a run name the config's (one directory name), checked first
    accepted = "must be one directory name" if field == "train.run_name" else "expected "
    assert len(lines) == 1 and lines[0].startswith(f"error: {field} = ") and accepted in lines[0], proc.stderr
    assert not proc.stdout and not (tmp_path / "runs").exists()


def test_resume_dir_with_shell_characters_is_refused(tmp_path):
    proc = lorasp_here("slurm", "submit", *injection("--resume", tmp_path), "--dry-run")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --resume = ") and not proc.stdout, proc.stderr


@pytest.mark.parametrize("name", ["a+b", ".r1"])
def test_resume_dir_the_job_would_refuse_is_refused_now(name, tmp_path):
    """The job passes the directory's name on as train.run_name: a name that rule refuses would fail on the node,
    after the queue, so it is refused at submit time by the same rule."""
    (tmp_path / name).mkdir()
    proc = lorasp_here("slurm", "submit", str(TINY), "--resume", str(tmp_path / name), "--dry-run")
    assert proc.returncode == 2 and not proc.stdout, proc.stderr
    assert proc.stderr.startswith(f"error: --resume = '{name}': expected one directory name"), proc.stderr


@pytest.mark.parametrize("job_id", ["--clusters=other", "1,2", "12\n"])
def test_a_job_id_that_is_not_one_is_refused(job_id):
    """JOBID reaches scontrol's and sacct's command lines, where `--clusters=other` would be an option."""
    for command in ("status", "logs"):
        proc = lorasp_here("slurm", command, "--", job_id)
        assert proc.returncode == 2 and not proc.stdout, proc.stderr
        assert proc.stderr.startswith(f"error: JOBID = {job_id!r}: expected a SLURM job id"), proc.stderr


def test_ordinary_values_pass_unchanged(tmp_path):
    proc = lorasp_here("slurm", "submit", str(TINY), f"train.output_dir={tmp_path}", "--partition", "a100,h100",
                  "--time", "2-12:30", "--account", "proj_1.x", "--sbatch=--constraint=a100&nvlink",
                  "--sbatch=--exclusive", "--sbatch=--mail-user=me@example.org", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    header = [line for line in proc.stdout.splitlines() if line.startswith("#SBATCH")]
    for option in ("--partition=a100,h100", "--time=2-12:30", "--account=proj_1.x", "--constraint=a100&nvlink",
                   "--exclusive", "--mail-user=me@example.org"):
        assert f"#SBATCH {option}" in header


def test_directives_after_a_command_are_refused(tmp_path):
    """sbatch would ignore them: the template's command before its first #SBATCH line is refused."""
    template = (REPO / "slurm" / "lorasp.sbatch").read_text()
    template = template.replace("#SBATCH --job-name", "umask 077\n#SBATCH --job-name")
    (tmp_path / "late.sbatch").write_text(template)
    proc = lorasp_here("slurm", "submit", str(TINY), f"train.output_dir={tmp_path}", "--template",
                  str(tmp_path / "late.sbatch"), "--dry-run")
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.startswith("error: --template: '#SBATCH --job-name=") and "after the first command ('umask" \
        in proc.stderr, proc.stderr


def test_no_sbatch_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    proc = lorasp_here("slurm", "submit", str(TINY), f"train.output_dir={tmp_path}")
    assert proc.returncode == 2 and "sbatch: not found on PATH" in proc.stderr, proc.stderr


# --- a real SLURM ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_slurm_says_no(slurm, slurm_jobs, tmp_path):
    def submit(*args):
        return lorasp("slurm", "submit", str(TINY), f"train.output_dir={tmp_path}", *args, env=slurm.env)

    proc = submit("--partition", "nope")
    assert proc.returncode == 2 and "sbatch refused the job: sbatch: error: invalid partition" in proc.stderr
    for partition, args in (("cpuonly", ("--partition", "cpuonly")), ("debug", ())):
        proc = submit("launcher.gpus_per_worker=1", *args, "--gpus-per-node", "2")
        assert proc.returncode == 2 and f"partition '{partition}' has no GPUs" in proc.stderr, proc.stderr
    proc = lorasp("slurm", "status", "1", env=slurm.env)
    assert proc.returncode == 2 and "job 1: unknown to SLURM" in proc.stderr
    assert not queued_besides(slurm, slurm_jobs, "PD")  # nothing was queued


@pytest.mark.slow
@pytest.mark.parametrize("field", ["--partition", "--sbatch", "train.run_name", "train.output_dir"])
def test_injection_never_runs_on_slurm(field, slurm, slurm_jobs, tmp_path):
    """Submitted for real: the value is refused, nothing is queued, and the injected command never runs."""
    marker = tmp_path / "PWNED"
    proc = lorasp("slurm", "submit", *injection(field, tmp_path), env=slurm.env)
    if proc.returncode == 0:  # submitted after all: let the job run, to see what it did
        job = re.search(r"submitted job (\d+)", proc.stdout)[1]
        slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    assert not marker.exists(), f"the injected command ran (job output: {proc.stdout})"
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {field} = "), proc.stderr
    assert not queued_besides(slurm, slurm_jobs)


@pytest.mark.slow
def test_directives_reach_slurm(slurm, tmp_path):
    """Every #SBATCH line is read: a held job shows the time limit, the requeue flag and the extra options."""
    job, _ = submit_job(slurm, tmp_path, "--time", "0:10:00", "--partition", "cpuonly", "--sbatch=--hold",
                        "--sbatch=--comment=ignored")
    try:
        fields = {f: slurm.job_field(job, f) for f in ("JobState", "TimeLimit", "Requeue", "Partition", "Reason")}
    finally:
        slurm.run("scancel", job, check=False)
    assert fields == {"JobState": "PENDING", "TimeLimit": "00:10:00", "Requeue": "1", "Partition": "cpuonly",
                      "Reason": "JobHeldUser"}, fields


@pytest.mark.slow
def test_ray_that_does_not_come_up_fails_the_job(slurm, tmp_path):
    # The head offers no CPUs (a later --num-cpus wins), so `ray status` never shows the allocation's.
    env = {**slurm.env, "LORASP_RAY_ARGS": "--num-cpus=0", "LORASP_RAY_TIMEOUT": "5"}
    job, run_dir = submitted(lorasp("slurm", "submit", str(TINY), f"train.output_dir={tmp_path}", *HALF_CPU, env=env))
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 180) == "FAILED"
    log = Path(f"{run_dir}.slurm-{job}.out").read_text()
    assert "error: the Ray cluster did not come up within 5s: want 1 nodes, 1 CPUs, 0 GPUs" in log
    assert "Ray cluster stopped" in log and not run_dir.exists()
    ray_tmp = Path(f"/tmp/ray-{job}")
    assert ray_tmp.is_dir()  # kept for its logs after a failure
    shutil.rmtree(ray_tmp)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm, slurm_jobs):
    (job, run_dir), usr1 = slurm_jobs[0]["preempted"], slurm_jobs[1]["preempted"]
    usr1.check()  # USR1 to the batch script, as SLURM sends it ahead of a preemption
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT_S) == "COMPLETED"
    assert slurm.job_field(job, "Restarts") == "1"
    log = Path(f"{run_dir}.slurm-{job}.out").read_text()
    stopped = int(re.search(r"\[lorasp\] stopped at step (\d+) \(SIGUSR1\)", log)[1])
    assert stopped < PREEMPT_STEPS and f"requeued job {job}" in log and "(restart 1)" in log
    steps = steps_logged(run_dir)
    redone = sum(n - 1 for n in Counter(steps).values())
    exit_code = int(re.search(r"lorasp launch exited with (\d+)", log)[1])  # the first start's
    record("SIGUSR1 (preemption)", entry="lorasp slurm submit", exit_code=exit_code, steps_lost=redone,
           data_lost=not (run_dir / "adapter" / "adapter_model.safetensors").is_file(),
           outcome=f"stopped at step {stopped} with a checkpoint; the job requeued itself and its next start "
                   "finished the run")
    assert exit_code == EXIT_STOPPED
    assert sorted(set(steps)) == list(range(1, PREEMPT_STEPS + 1)) and redone <= SAVE_EVERY, steps  # one interval
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_job_runs_to_completion(slurm, slurm_jobs):
    """The preempted job, once resumed, ends as a job that ran straight through does (the cancelled and NaN jobs show
    that a job nobody asked to requeue is not requeued)."""
    job, run_dir = slurm_jobs[0]["preempted"]
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT_S) == "COMPLETED"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "memory_report.json").is_file() and (run_dir / "memory_report.md").is_file()
    assert steps_logged(run_dir)[-1] == PREEMPT_STEPS
    assert not Path(f"/tmp/ray-{job}").exists()  # the job's Ray temp dir went with it

    status = lorasp("slurm", "status", job, env=slurm.env)
    assert status.returncode == 0 and f"job {job}: COMPLETED" in status.stdout and "(finished)" in status.stdout
    logs = lorasp("slurm", "logs", job, env=slurm.env)
    assert logs.returncode == 0
    assert "Ray cluster up: 1 nodes, 1 CPUs, 0 GPUs" in logs.stdout and "Ray cluster stopped" in logs.stdout
    assert "lorasp launch exited with 0" in logs.stdout


@pytest.mark.slow
def test_nan_run_fails_the_slurm_job_with_exit_4(slurm, slurm_jobs):
    """The batch job passes `lorasp launch`'s 4 on: FAILED with exit code 4, not requeued, with a line saying why.
    Under Ray a NaN stop is deliberate: the ranks return, and Ray Train does not restart the group its
    launcher.max_failures (2) times as it would a crash."""
    job, run = slurm_jobs[0]["nan"]
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT_S) == "FAILED"
    assert slurm.job_field(job, "ExitCode") == "4:0" and slurm.job_field(job, "Restarts") == "0"
    log = Path(f"{run}.slurm-{job}.out").read_text()
    # its first Ray head was killed as it came up (RAY_HEAD_FAILS_ONCE): the script started the cluster again
    assert "a Ray node exited while the cluster came up (see its output above): start 2 of 3" in log
    assert log.index("start 2 of 3") < log.index("Ray cluster up: 1 nodes, 1 CPUs, 0 GPUs")
    record("Ray head exits while it starts (SLURM)", entry="lorasp slurm submit", exit_code=None, steps_lost=0,
           data_lost=False, outcome="the batch script started its Ray cluster again on the same ports; the run went on")
    assert f"error: the loss went NaN/inf, see {run}/nonfinite.json" in log and "lorasp launch exited with 4" in log
    first_bad, last, newest = check_nothing_saved_from_bad_steps(run)
    assert f"[lorasp] stopped at step {last}: NaN/inf loss" in log and "training failed" not in log
    for rank in (0, 1):  # one start per rank: never restarted as a crash
        assert (run / "logs" / f"rank{rank}.log").read_text().count(f"[lorasp] rank {rank} pid ") == 1
    record("NaN / non-finite loss (Ray)", entry="lorasp launch (SLURM job)", exit_code=4, steps_lost=last - newest,
           data_lost=not ckpt.verify(ckpt.step_dir(run, newest))[0],
           outcome=f"loss NaN from step {first_bad}; stopped at step {last} with no restart, nothing saved from "
                   f"steps {first_bad}-{last}, checkpoint of step {newest} intact, no adapter; the job FAILED with "
                   "exit code 4, not requeued")


@pytest.mark.slow
def test_scancel_checkpoints_and_does_not_requeue(slurm, slurm_jobs):
    """Plain `scancel`: SIGTERM to every process of the job (Ray's included), SIGKILL KillWait seconds later. Every
    rank checkpoints in between, `lorasp launch` exits 3 and the job does not requeue."""
    (job, run_dir), cancel = slurm_jobs[0]["cancelled"], slurm_jobs[1]["cancelled"]
    cancel.check()
    log_file = Path(f"{run_dir}.slurm-{job}.out")
    deadline = time.monotonic() + 120
    while "Ray cluster stopped" not in log_file.read_text() and time.monotonic() < deadline:
        time.sleep(1)
    log = log_file.read_text()
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "CANCELLED"
    stopped = re.search(r"\[lorasp\] stopped at step (\d+) \(SIGTERM\)", log)
    exit_code = re.search(r"lorasp launch exited with (\d+)", log)
    checkpoint = ckpt.step_dir(run_dir, int(stopped[1])) if stopped else None
    intact = checkpoint is not None and ckpt.verify(checkpoint)[0]
    steps = steps_logged(run_dir)
    lost = max(steps) - int(stopped[1]) if stopped else max(steps)
    record("scancel (SIGTERM to every process)", entry="lorasp slurm submit", exit_code=exit_code and
           int(exit_code[1]), steps_lost=lost, data_lost=not intact,
           outcome=f"checkpoint at step {stopped[1]}, not requeued" if intact else "no checkpoint")
    assert stopped and intact, log[-4000:]
    assert int(exit_code[1]) == EXIT_STOPPED and lost == 0
    assert "requeued" not in log and slurm.job_field(job, "Restarts") == "0"
    assert "Ray cluster stopped" in log


def test_a_secret_on_the_command_line_is_refused(tmp_path):
    """A secret `env` override would be written into the batch script, which SLURM stores: refused, not echoed."""
    proc = lorasp_here("slurm", "submit", str(TINY), f"train.output_dir={tmp_path}", "env.HF_TOKEN=hf_abc123",
                       "--dry-run")
    assert proc.returncode == 2 and not proc.stdout and "hf_abc123" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: env.HF_TOKEN = <redacted>: a secret given on the command line")
