"""The run config and the CLI: YAML + dotted overrides, and one clear line with exit code 2 for every bad input."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from launcher.cli import FLAG_FIELDS
from lorasp_dist import cli
from lorasp_dist.cli import main
from lorasp_dist.config import ConfigError, RunConfig, load_config, make_lorasp_config
from lorasp_dist.engine.run_dir import unique_run_name

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorasp_dist", *args], capture_output=True, text=True, cwd=REPO)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lorasp:\n  r: 8\ntrain:\n  max_steps: 3\n")
    cfg = load_config(f, ["lorasp.ratio=0.25", "train.max_steps=10", "lorasp.target_modules=[q_proj, v_proj]"])
    assert (cfg.lorasp.r, cfg.lorasp.ratio, cfg.train.max_steps) == (8, 0.25, 10)
    assert cfg.lorasp.target_modules == ["q_proj", "v_proj"]
    assert cfg.env["NCCL_NVLS_ENABLE"] == "0"


def test_examples_are_valid():
    for f in sorted((REPO / "examples").glob("*.yaml")):
        load_config(f)


def test_print_config_round_trips(capsys):
    assert main(["print-config", "lorasp.ratio=0.25"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lorasp"]["ratio"] == 0.25
    assert load_config(None, []).model_dump(mode="json").keys() == printed.keys()


BAD = [
    ("lorasp.ratio=0", "lorasp.ratio = 0"),
    ("lorasp.ratio=1.5", "lorasp.ratio = 1.5"),
    ("lorasp.ratio=-0.5", "lorasp.ratio = -0.5"),
    ("lorasp.r=0", "lorasp.r = 0"),
    ("lorasp.r=-4", "lorasp.r = -4"),
    ("lorasp.strategy=zigzag", "lorasp.strategy = 'zigzag': accepted: 'random', 'rows' or 'cols'"),
    ("lorasp.variant=dora", "lorasp.variant = 'dora'"),
    ("lorasp.rank=8", "lorasp.rank: unknown key"),
    ("trainer.max_steps=8", "trainer: unknown key"),
    ("model.preset=llama-1b", "model.preset = 'llama-1b': unknown preset; accepted: tiny, llama-7b"),
    ("data.seq_len=0", "data.seq_len = 0"),
    ("deepspeed.config=zero2", "deepspeed.config = 'zero2'"),
    ("lorasp.ratio", "expected KEY=VALUE"),
    ("train.run_name=../../x", "train.run_name = '../../x': must be one directory name: letters, digits"),
    ("train.run_name=/tmp/x", "train.run_name = '/tmp/x': must be one directory name"),
    ("train.run_name=.hidden", "train.run_name = '.hidden': must be one directory name"),
    ("train.run_name=a/b", "train.run_name = 'a/b': must be one directory name"),
    ("launcher.gpus_per_worker=inf", "launcher.gpus_per_worker = 'inf': must be a finite number"),
    ("launcher.cpus_per_worker=nan", "launcher.cpus_per_worker = 'nan': must be a finite number"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_override_one_line_exit_2(override, message, capsys):
    assert main(["validate", str(REPO / "examples" / "tiny.yaml"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_yaml_files(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("lorasp:\n  r: [8\n")
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "malformed YAML at line" in err and str(broken) in err and len(err.strip().splitlines()) == 1
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert main(["validate", str(scalar)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_no_target_matching_through_the_cli(capsys):
    # target names are checked against the model when LoRA-SP is applied; the API error is a ConfigError
    from transformers import LlamaForCausalLM

    from lorasp_dist.lorasp import LoRASPConfig, apply_lorasp
    from lorasp_dist.presets import PRESETS

    model = LlamaForCausalLM(PRESETS["tiny"].hf_config())
    with pytest.raises(ConfigError, match="lorasp.target_modules = 'wq'"):
        apply_lorasp(model, LoRASPConfig(target_modules=["wq"]))


def test_lorasp_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^lorasp.ratio = 2"):
        make_lorasp_config(ratio=2)
    with pytest.raises(ConfigError, match=r"^lorasp.strategy = 'diag'"):
        make_lorasp_config(strategy="diag")


def test_entry_points_work_as_processes(tmp_path):
    help_ = run_cli("--help")
    assert help_.returncode == 0 and "validate" in help_.stdout
    bad = run_cli("validate", str(REPO / "examples" / "tiny.yaml"), "lorasp.ratio=0")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "lorasp.ratio = 0" in bad.stderr


def test_launcher_commands_from_a_checkout_without_entry_points(monkeypatch, capsys):
    """`python -m lorasp_dist launch` in a checkout nobody installed: no entry points, the in-tree launcher."""
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    for command in ("launch", "slurm"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and f"usage: lorasp {command}" in capsys.readouterr().out
    installed = {ep.name: ep.value for ep in entry_points(group=cli.COMMANDS_GROUP)}  # from pyproject.toml
    assert cli.IN_TREE_COMMANDS == installed


def test_run_names_are_unique_under_any_launcher():
    """torchrun and `lorasp launch` name a run the same way: time, model and a random suffix."""
    cfg = load_config(REPO / "examples" / "tiny.yaml")
    names = {unique_run_name(cfg) for _ in range(3)}  # the same second
    assert len(names) == 3 and all(re.fullmatch(r"\d{8}-\d{6}-tiny-[0-9a-f]{6}", n) for n in names)


@pytest.mark.parametrize("name", ["../escaped", "/tmp/lorasp-escaped-run"])
def test_run_name_never_leaves_output_dir(tmp_path, name):
    """A run name is one directory inside train.output_dir: `..` and absolute names are refused before any write."""
    out = tmp_path / "a" / "runs"
    for command in ("train", "launch"):
        proc = run_cli(command, str(REPO / "examples" / "tiny.yaml"), f"train.output_dir={out}",
                       f"train.run_name={name}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [f"error: train.run_name = '{name}': must be one directory name: "
                                                    "letters, digits, '.', '_' and '-', not starting with '.'"]
    assert not any(tmp_path.rglob("*")) and not Path("/tmp/lorasp-escaped-run").exists()


def test_rank_env_sets_expandable_segments_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert RunConfig().rank_env()["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in RunConfig(memory={"expandable_segments": False}).rank_env()
    mine = RunConfig(env={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"})
    assert mine.rank_env()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"  # the user's setting wins
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.8")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in RunConfig().rank_env()  # the launching shell's too


@pytest.mark.parametrize("env, needle", [
    ("  A=B: x\n", "key 'A=B': expected an environment variable name"),
    ("  '': x\n", "key '': expected an environment variable name"),
    ("  HF_TOKEN: \"hf_\\0secret\"\n", "key 'HF_TOKEN': its value holds a NUL character"),
])
def test_env_names_and_values_are_checked_before_any_rank(env, needle, tmp_path):
    """A key no environment takes, or a NUL in a value, is a config error at load time, not a crash in every rank.
    The value is never echoed: it may be a secret."""
    path = tmp_path / "c.yaml"
    path.write_text("env:\n" + env)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith("env = {...}: ") and needle in str(exc.value) and "secret" not in str(exc.value)


def test_env_overrides_keep_the_defaults(tmp_path):
    """Setting one `env` variable (a dotted override or the config's own section) keeps NVLink multicast off."""
    cfg = load_config(REPO / "examples" / "tiny.yaml", ["env.WANDB_MODE=offline"])
    assert cfg.env["WANDB_MODE"] == "offline" and cfg.env["NCCL_NVLS_ENABLE"] == "0"
    path = tmp_path / "c.yaml"
    path.write_text("env:\n  NCCL_NVLS_ENABLE: '1'\n  FOO: bar\n")
    cfg = load_config(path)
    assert cfg.env["NCCL_NVLS_ENABLE"] == "1" and cfg.env["FOO"] == "bar"  # an explicit value wins
    assert cfg.env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and cfg.env["HF_HUB_OFFLINE"] == "1"


def test_the_resume_hint_redacts_secrets():
    """`lorasp launch` prints (and logs to driver.log) its command line as the resume hint: a secret env value is
    redacted there, as in config.yaml."""
    from launcher.cli import _command

    args = argparse.Namespace(config="c.yaml", overrides=["env.HF_TOKEN=hf_abc123", "env.WANDB_MODE=offline"],
                              **{key: None for key in FLAG_FIELDS})
    assert _command(args) == "lorasp launch c.yaml 'env.HF_TOKEN=<redacted>' env.WANDB_MODE=offline"
