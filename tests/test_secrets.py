"""Secret-looking `env` values (HF_TOKEN, WANDB_API_KEY, ...) are never written or printed, and stay out of Ray's
runtime_env, yet every rank still gets them: `validate`, `print-config` and `launch --dry-run` in process, then a
real 2-rank `lorasp launch` on a local Ray whose rank processes report what they saw."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
from test_launcher import launch, ray_env  # noqa: F401  (ray_env is a fixture)

from launcher.cluster import worker_env
from lorasp_dist.cli import main
from lorasp_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.yaml")
SECRET = f"hf_{uuid.uuid4().hex}"
# Loaded by every Python process that has the probe on its PYTHONPATH (Ray's rank processes included): once
# LORASP_PROBE_TOKEN appears in the process's environment, it writes whether the variable was there from the start
# (a runtime_env puts it there) and a hash of its value.
PROBE = """
import hashlib, json, os, threading, time

def _watch(out, key):
    with open("/proc/self/environ", "rb") as f:
        initial = any(item.startswith(key.encode() + b"=") for item in f.read().split(b"\\0"))
    while key not in os.environ:
        time.sleep(0.2)
    seen = hashlib.sha256(os.environ[key].encode()).hexdigest()
    with open(os.path.join(out, str(os.getpid())), "w") as f:
        json.dump({"initial": initial, "sha256": seen}, f)

if os.environ.get("LORASP_PROBE_OUT"):
    threading.Thread(target=_watch, args=(os.environ["LORASP_PROBE_OUT"], "LORASP_PROBE_TOKEN"), daemon=True).start()
"""


def holders(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes()]


def test_printed_configs_hold_no_secret(tmp_path, capsys):
    override = f"env.HF_TOKEN={SECRET}"
    for argv in (["validate", TINY, override], ["print-config", override],
                 ["launch", TINY, "--dry-run", f"train.output_dir={tmp_path}", override]):
        assert main(argv) == 0, argv
        out = capsys.readouterr()
        assert SECRET not in out.out + out.err, argv
        assert "HF_TOKEN: <redacted>" in out.out, argv
    assert main(["validate", TINY, "env.MY_API_KEY=[1]"]) == 2  # an error names the key, never the value
    assert capsys.readouterr().err == "error: env.MY_API_KEY = <redacted>: must be a valid string\n"
    cfg = load_config(TINY, [override, "env.TOKENIZERS_PARALLELISM='false'"])
    assert cfg.env["HF_TOKEN"] == SECRET  # the config itself keeps the value, for the ranks
    assert "HF_TOKEN" not in worker_env(cfg)  # ... but Ray's runtime_env never gets it
    assert worker_env(cfg)["TOKENIZERS_PARALLELISM"] == "false"  # TOKEN inside a longer word is no secret
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_ranks_get_a_secret_no_file_holds(ray_env, tmp_path):  # noqa: F811
    probe, seen = tmp_path / "probe", tmp_path / "seen"
    probe.mkdir()
    seen.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    env = {**ray_env, "PYTHONPATH": str(probe), "LORASP_PROBE_OUT": str(seen)}
    proc = launch(env, f"train.output_dir={tmp_path}", "train.run_name=secret", "train.max_steps=2",
                  "train.eval_every=0", f"env.LORASP_PROBE_TOKEN={SECRET}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = tmp_path / "secret"
    assert "LORASP_PROBE_TOKEN: <redacted>" in (run / "config.yaml").read_text()
    want = hashlib.sha256(SECRET.encode()).hexdigest()
    for rank in (0, 1):
        pid = (run / "pids" / f"rank{rank}").read_text().strip()
        report = json.loads((seen / pid).read_text())
        assert report == {"initial": False, "sha256": want}, (rank, report)  # set by the engine, not by Ray
    assert SECRET not in proc.stdout + proc.stderr
    assert holders(run, SECRET) == []
    assert holders(Path(ray_env["RAY_TMPDIR"]), SECRET) == []  # Ray's session logs and state
