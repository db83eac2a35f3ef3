"""Secret-looking `env` values (HF_TOKEN, WANDB_API_KEY, ...) are never written or printed, and stay out of Ray's
runtime_env, yet every rank still gets them: `validate`, `print-config` and `launch --dry-run` in process here. The
real 2-rank `lorasp launch` whose rank processes report what they saw (PROBE) is the README's main job, run once for
several tests: test_ranks_get_a_secret_no_file_holds in tests/test_launcher.py."""

from __future__ import annotations

import uuid
from pathlib import Path

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
