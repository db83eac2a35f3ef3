"""Outputs that appear whole or not at all (lorasp_dist/atomic.py): a replaced directory is swapped in one step."""

from __future__ import annotations

import os

import pytest

from lorasp_dist import atomic


def write_old(out):
    out.mkdir()
    (out / "old.txt").write_text("old")


def test_replace_swaps_in_one_step(tmp_path, monkeypatch):
    """With an atomic exchange (Linux), replacing `out` needs no second rename: there is no moment without `out`."""
    out = tmp_path / "adapter"
    write_old(out)
    renames = []
    real_rename = os.rename

    def first_rename_only(src, dst):  # the attempt to take `out` by a plain rename, which fails: it holds files
        renames.append((src, dst))
        if len(renames) > 1:
            raise AssertionError("a second rename: `out` would be missing in between")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", first_rename_only)
    with atomic.atomic_dir(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and len(renames) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp or old copy left beside it


def test_replace_without_an_exchange_falls_back(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    write_old(out)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic.atomic_dir(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_block_leaves_out_as_it_was(tmp_path):
    out = tmp_path / "adapter"
    write_old(out)
    with pytest.raises(RuntimeError), atomic.atomic_dir(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
