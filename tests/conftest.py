"""Shared test set-up: one DeepSpeed extension cache for the whole run, its ops built in the background while the quick
tests run first, CPU DeepSpeed, offline hubs; the tiny preset's tokenizer and base built once; one Ray cluster for the
tests that join one with `--address`; one SLURM cluster, whose long jobs start with the first slow test on Ray; under
pytest-xdist (pyproject's addopts), the tests on Ray and SLURM in one worker and the others in the other."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from faults import write as write_fault_table
from filelock import FileLock
from ports import free_ports
from ray_cluster import RayEnv, RayHead
from slurm_cluster import SlurmCluster, missing_binaries
from slurm_jobs import NODE_CPUS, submit_jobs
from transformers import LlamaForCausalLM

from lorasp_dist.config import DataConfig
from lorasp_dist.data import load_tokenizer, train_tokenizer
from lorasp_dist.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
# fp32, so that a resumed run can be compared with an uninterrupted one; a checkpoint every 5 of 15 steps
EXACT_STEPS, EXACT_EVERY = 15, 5
EXACT = ("train.precision=fp32", f"train.max_steps={EXACT_STEPS}", f"train.save_every={EXACT_EVERY}",
         "train.eval_every=0", "train.keep_last=5")
# ChatML with the sentencepiece tokenizer's own control tokens, so the tiny base is instruction-formatted like SmolLM2.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

# DeepSpeed JIT-builds its CPU Adam (~50 s) on first use: build it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # A thread per worker, in it and in what it starts: OpenMP threads that spin for a core the other worker holds
    # made a 1-s training test take 70 s.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
_ops_build: subprocess.Popen | None = None


def pytest_sessionfinish(session, exitstatus):
    if _ops_build is not None:
        _ops_build.wait()  # never cut short: a build killed mid-way leaves torch's lock file, which later loads wait on
    write_fault_table()


def pytest_collection_modifyitems(config, items):
    # The quick tests first (a stable sort: the slow ones keep their order), while DeepSpeed's ops build for the others.
    items.sort(key=lambda item: "slow" in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The modules on a Ray instance or SLURM. Their tests mostly wait (Ray starting actors and polling them, SLURM
# scheduling) and share the session's Ray cluster and SLURM jobs, so pytest-xdist gives them all to one worker, while
# the other runs the busy modules (DeepSpeed on CPU).
CLUSTER_MODULES = {"test_launcher.py", "test_slurm.py", "test_instruct_smoke.py", "test_quality_engine_smoke.py"}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        """A module at a time, so that its module fixtures are built once; the cluster modules as one unit."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return "cluster" if Path(module).name in CLUSTER_MODULES else module

    return ByModule(config, log)


def pytest_collection_finish(session):
    """A session with DeepSpeed runs (the `slow` tests) builds DeepSpeed's JIT ops in the background (tests/ds_ops.py),
    once, into the one TORCH_EXTENSIONS_DIR; when they are built already it only loads them."""
    global _ops_build
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return  # one build for the run: a worker that needs an op first waits on torch's lock for it
    if any("slow" in item.keywords for item in session.items):
        ext_dir = Path(os.environ["TORCH_EXTENSIONS_DIR"])
        ext_dir.mkdir(parents=True, exist_ok=True)
        with open(ext_dir / "ds_ops.log", "ab") as out:
            _ops_build = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ds_ops.py"))], cwd=REPO,
                                          stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def seed_tiny(tmp_path_factory) -> Callable[[Path], Path]:
    """`seed_tiny(out)` puts examples/tiny.yaml's tokenizer and synthetic 4-bit base, built once for the session, in
    `out/.cache`, where a run with train.output_dir=out finds them instead of building them (~5 s a run)."""
    from lorasp_dist.config import load_config
    from lorasp_dist.engine.train import preflight

    built = tmp_path_factory.mktemp("tiny-cache")
    preflight(load_config(str(TINY), [f"train.output_dir={built}"]))

    def seed(out: Path) -> Path:
        shutil.copytree(built / ".cache", out / ".cache", dirs_exist_ok=True)
        return out

    return seed


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory) -> Path:
    """A tiny random LLaMA whose tokenizer has a chat template, for the bench scripts' smoke tests
    (tests/test_instruct_smoke.py, tests/test_quality_engine_smoke.py): built once for the session."""
    root = tmp_path_factory.mktemp("chat-base")
    tok = load_tokenizer(train_tokenizer(DataConfig(mode="instruction"), root / "tok", vocab_size=512))
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = PRESETS["tiny"].hf_config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """`lorasp train ARGS` as `nproc` ranks under torchrun, on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_ports(1)[0]), "-m", "lorasp_dist", "train", *args]


@pytest.fixture(scope="session")
def uninterrupted(seed_tiny, tmp_path_factory, worker_id) -> Path:
    """examples/tiny.yaml with EXACT's settings, never interrupted (`lorasp train`, 2 ranks under torchrun): the run
    that the runs killed, stopped or resumed, under torchrun or `lorasp launch`, must match. Built once for the whole
    run: the pytest-xdist worker that asks first builds it, under a lock in the directory the workers share."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base
    out = shared / "uninterrupted"
    with FileLock(str(shared / "uninterrupted.lock")):
        if not (out / "whole" / "summary.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # half a run, from a worker that failed: built again
            seed_tiny(out)
            cmd = torchrun(str(TINY), f"train.output_dir={out}", "train.run_name=whole", *EXACT)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out / "whole"


@pytest.fixture
def tiny_out(tmp_path, seed_tiny) -> Path:
    """tmp_path, seeded as a train.output_dir for examples/tiny.yaml."""
    return seed_tiny(tmp_path)


@pytest.fixture
def ray_env() -> Iterator[dict]:
    """The environment for one test's own Ray processes (a local instance that `lorasp launch` starts)."""
    with RayEnv() as env:
        yield env


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[tuple[RayHead, dict]]:
    """A second Ray cluster, started the way SLURM starts one, which `lorasp launch --address` joins: one for the
    session, shared by every test that needs a cluster but not a Ray instance of its own."""
    with RayEnv() as env:
        head = RayHead(env)
        try:
            yield head, env
        finally:
            head.stop()


def _slurm_missing() -> str | None:
    missing = missing_binaries()
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)}): run .ci/setup as root"
    return "slurmd must run as root" if os.geteuid() != 0 else None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A real single-node SLURM (tests/slurm_cluster.py), one for the session."""
    missing = _slurm_missing()
    if missing:
        pytest.skip(missing)
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=NODE_CPUS) as c:
        yield c


@pytest.fixture(scope="session")
def slurm_jobs(slurm, seed_tiny, tmp_path_factory) -> Iterator[tuple[dict, dict]]:
    """tests/slurm_jobs.py's jobs, submitted together; the two stopped mid-run get their signal from a thread,
    whenever they run. Their tests wait for them in turn."""
    queued, signals = submit_jobs(slurm, lambda name: seed_tiny(tmp_path_factory.mktemp(name)))
    yield queued, signals
    for job, _ in queued.values():  # kept after a failure, for its logs
        shutil.rmtree(f"/tmp/ray-{job}", ignore_errors=True)


@pytest.fixture(autouse=True)
def slurm_jobs_first(request) -> None:
    """In a session with tests that read the SLURM jobs, the first slow test on Ray submits them, so that they run
    beside the Ray launches (tests/slurm_jobs.py): a launch leaves a third of the 2 CPUs idle while Ray starts its
    actors and polls them, where the DeepSpeed runs before them keep both busy. An error here is kept by pytest and
    reported by the tests that read the jobs."""
    on_ray = {"ray_cluster", "ray_env"} & set(request.fixturenames)
    if "slow" in request.keywords and on_ray and _slurm_missing() is None and \
            any("slurm_jobs" in item.fixturenames for item in request.session.items):
        try:
            request.getfixturevalue("slurm_jobs")
        except Exception:
            pass
