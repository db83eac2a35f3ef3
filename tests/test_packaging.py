"""A wheel (a non-editable install) carries the files the code reads from the repository's top level: the DeepSpeed
templates and the sbatch template, found by lorasp_dist.shipped once there is no checkout beside the package."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lorasp_dist.shipped as shipped_mod

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_templates_where_shipped_finds_them(tmp_path, monkeypatch):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(REPO / name, src / name)
    for name in ["lorasp_dist", "launcher", "ds_configs", "slurm"]:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lorasp_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for rel in ["ds_configs/zero3.json", "ds_configs/zero3_offload_all.json", "slurm/lorasp.sbatch"]:
        assert any(n.endswith(f".data/data/share/lorasp-dist/{rel}") for n in names), (rel, names)

    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip would uninstall the project from the running environment first.
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--ignore-installed", "--prefix", str(prefix),
                    str(wheel)], check=True, capture_output=True)
    # As an installed package sees it: no checkout beside it, sys.prefix the install prefix.
    monkeypatch.setattr(shipped_mod, "CHECKOUT", tmp_path / "no-checkout")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    for rel in ["ds_configs/zero3_offload_optimizer.json", "slurm/lorasp.sbatch"]:
        found = shipped_mod.shipped(rel)
        assert found == prefix / "share" / "lorasp-dist" / rel
        assert found.read_bytes() == (REPO / rel).read_bytes()


def test_checkout_copy_comes_first():
    assert shipped_mod.shipped("ds_configs") == REPO / "ds_configs"
    assert shipped_mod.shipped("slurm/lorasp.sbatch") == REPO / "slurm" / "lorasp.sbatch"
