"""bench/instruct_smollm2.py end to end on CPU at tiny scale: a tiny random LLaMA whose tokenizer has a chat template,
a BIG-bench-style short-answer task, zero-shot eval, `lorasp launch` with 2 CPU workers on the session's Ray cluster
(`--address`), eval of the adapter, and the JSON + Markdown records. The GPU run is the same command at full size, on
a local Ray, over several tasks: each goes through the same steps (a task's metric, multiple choice or exact match, is
`lorasp eval`'s, tests/test_gguf_bigbench_eval.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_quality_smoke import write_tasks  # the same toy BIG-bench tasks

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
def load_instruct_bench():
    spec = importlib.util.spec_from_file_location("instruct_smollm2", REPO / "bench" / "instruct_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_instruct_bench_runs_end_to_end(tmp_path, chat_base, ray_cluster, capsys):
    head, env = ray_cluster
    bb, out = write_tasks(tmp_path), tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "instruct_smollm2.py"), "--base", str(chat_base), "--bigbench-dir",
           str(bb), "--tasks", "toy_next", "--work", str(tmp_path / "work"), "--out", str(out),
           "--name", "smoke", "--steps", "3", "--micro-batch-size", "2", "--seq-len", "64", "--precision", "fp32",
           "--max-eval", "4", "--eval-batch-size", "4", "--max-new-tokens", "3", "--num-workers", "2",
           "--gpus-per-worker", "0", "--address", head.address]
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    record = json.loads((out / "smoke.json").read_text())
    assert record["git_rev"] and record["settings"]["steps"] == 3
    rows = {r["task"]: r for r in record["rows"]}
    assert list(rows) == ["toy_next"] and rows["toy_next"]["metric"] == "exact_match"
    for task, r in rows.items():
        assert r["template"] == "chat" and r["n_test"] == 4 and len(r["loss_curve"]) == 3
        for key in ("zero_shot_test", "zero_shot_test_dense", "fine_tuned_test"):
            assert 0 <= r[key] <= 1
        # The first logged loss is the NF4 base's on the same rows (B starts at zero): the script and the engine
        # read the same rows, rendered, packed and ordered the same way.
        assert r["first_step_loss"] == pytest.approx(r["rows_loss_nf4"], rel=1e-3)
        assert r["scored_tokens_per_step"] > 0 and r["scored_tokens_per_s"] < r["tokens_per_s"]
        for name in ("zero-shot", "zero-shot-dense", "fine-tuned"):
            preds = (out / "smoke" / f"{task}-{name}.predictions.jsonl").read_text().splitlines()
            assert len(preds) == 4 and {"input", "prediction", "target", "correct"} <= set(json.loads(preds[0]))
    md = (out / "smoke.md").read_text()
    assert "| toy_next | exact_match |" in md and "beats_zero_shot" in md

    # --collect rebuilds the same rows from the files the run left, for a call cut short after its tasks ran; it only
    # reads files, so its main() runs in this process (its own would spend seconds importing torch)
    instruct = load_instruct_bench()
    collect = ["--collect", "--bigbench-dir", str(bb), "--tasks", "toy_next", "--work",
               str(tmp_path / "work"), "--out", str(out), "--name", "again", "--device", "CPU (test)", "--git-rev",
               "test"]
    assert instruct.main(collect) == 0
    again = json.loads((out / "again.json").read_text())
    assert again["device"] == "CPU (test)" and again["git_rev"] == "test"
    assert again["rows"] == record["rows"]
    # a work directory without a task's results: one line and exit 2, no record written
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = [*collect[:collect.index("--work") + 1], str(empty), *collect[collect.index("--work") + 2:]]
    bad[bad.index("again")] = "none"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        instruct.main(bad)
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.strip().splitlines()[-1].startswith("error: --work = ")
    assert "Traceback" not in stderr and not (out / "none.json").exists() and not (out / "none").exists()
