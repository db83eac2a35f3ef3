"""Mask redraws (`lorasp.resample_every`) under real DeepSpeed ZeRO-3: 2 CPU ranks (gloo, and 4 in one run), the tiny
4-bit model.

tests/zero3_probe.py runs the real recipe and records, around every redraw, what DeepSpeed holds on each rank: the
gathered matrices, the optimizer's fp32 master and Adam moments, each rank's partitions and persistent full copies.
The offload configs' runs are also the engine's test of them (tests/test_engine.py's checks): one run per config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_ports
from safetensors.torch import load_file
from test_engine import REPO, TINY, check_trains_and_partitions, digest, metrics, refused_in_process, train

from lorasp_dist.engine import checkpoint as ckpt

PROBE = REPO / "tests" / "zero3_probe.py"
pytestmark = pytest.mark.slow

EVERY, STEPS = 2, 6  # redraws before steps 3 and 5
COMMON = ("train.eval_every=0", "train.warmup_steps=0", "train.lr_schedule=constant", "train.lr=5e-3",
          "train.weight_decay=0.1")
REDRAWN = (*COMMON, f"lorasp.resample_every={EVERY}", f"train.max_steps={STEPS}")


def probed_run(out: Path, name: str, *overrides: str, nproc: int = 2) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Run the probe (COMMON, then `overrides`) on `nproc` ranks; rank -> {tag: {"{layer}.{A|B}.{field}": tensor}}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_ports(1)[0]), str(PROBE), str(TINY), f"train.output_dir={out}",
           f"train.run_name={name}", *COMMON, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = {}
    for rank in range(nproc):
        tags: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in load_file(out / name / "probe" / f"rank{rank}.safetensors").items():
            tag, field = key.split("/", 1)
            tags.setdefault(tag, {})[field] = value
        ranks[rank] = tags
    return ranks


def unpack(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Packed per-trainable-entry values -> a dense matrix, zero at frozen entries."""
    full = torch.zeros(mask.shape, dtype=packed.dtype)
    full[mask] = packed.reshape(-1)
    return full


def check_partitions(tags: list[dict[str, torch.Tensor]], matrices: list[str]) -> int:
    """One tag on every rank: each rank's partition is its slice of the gathered parameter (in rank order, padded
    alike), a persistent full copy is the gathered one, and all ranks gathered the same. Returns how many full
    copies rank 0 holds."""
    tag, whole = tags[0], 0
    for m in matrices:
        values = tag[f"{m}.train_values"]
        parts = [t[f"{m}.part.train_values"] for t in tags]
        assert len({p.numel() for p in parts}) == 1, m
        assert torch.equal(torch.cat(parts)[:values.numel()], values), m
        for name in ("train_values", "frozen_values", "mask_bits"):
            copy = tag.get(f"{m}.whole.{name}")
            if copy is not None:
                whole += 1
                parts = torch.cat([t[f"{m}.part.{name}"] for t in tags])
                assert torch.equal(copy.reshape(-1), parts[:copy.numel()]), (m, name)
        for field in ("dense", "mask", "master", "exp_avg", "exp_avg_sq"):
            if f"{m}.{field}" in tag:
                assert all(torch.equal(tag[f"{m}.{field}"], t[f"{m}.{field}"]) for t in tags[1:]), (m, field)
        dense, mask = tag[f"{m}.dense"], tag[f"{m}.mask"]
        assert torch.equal(dense[mask], tag[f"{m}.train_values"])
        assert torch.equal(tag[f"{m}.master"].to(dense.dtype), tag[f"{m}.train_values"])  # master and parameter agree
    return whole


def check_redraws(ranks: dict, every: int, steps: int) -> dict[str, int]:
    """A redraw before every step after a multiple of `every`, up to `steps`."""
    tags = ranks[0]
    redraws = range(every + 1, steps + 1, every)
    matrices = sorted({k.rsplit(".", 1)[0] for k in tags["start0"] if k.endswith(".dense")})
    assert matrices and sorted(tags) == sorted(["start0", f"end{steps}", *(f"{w}{s}" for s in redraws
                                                                            for w in ("before", "after"))])
    counts = {"matrices": len(matrices), "kept": 0, "new": 0, "whole_copies": 0, "frozen_b_nonzero": 0}
    for tag in tags:
        counts["whole_copies"] += check_partitions([ranks[r][tag] for r in sorted(ranks)], matrices)
    for step in redraws:
        before, after = tags[f"before{step}"], tags[f"after{step}"]
        for m in matrices:
            old, new = before[f"{m}.mask"], after[f"{m}.mask"]
            assert int(old.sum()) == int(new.sum()) and not torch.equal(old, new), m
            assert torch.equal(after[f"{m}.dense"], before[f"{m}.dense"]), m  # every entry of A and B kept
            kept, added = old & new, new & ~old
            master_old, master_new = unpack(before[f"{m}.master"], old), unpack(after[f"{m}.master"], new)
            assert torch.equal(master_new[kept], master_old[kept]), m  # fp32 master carried
            assert torch.equal(master_new[added], before[f"{m}.dense"][added].float()), m  # from the frozen value
            for key in ("exp_avg", "exp_avg_sq"):
                carried, fresh = unpack(after[f"{m}.{key}"], new), unpack(before[f"{m}.{key}"], old)
                assert torch.equal(carried[kept], fresh[kept]), (m, key)
                assert torch.count_nonzero(carried[added]) == 0, (m, key)
                assert torch.count_nonzero(fresh[kept]) > 0, (m, key)  # there was something to carry
            counts["kept"] += int(kept.sum())
            counts["new"] += int(added.sum())
            if m.endswith(".B"):  # B's frozen half is no longer all zero: it trained before this redraw froze it
                counts["frozen_b_nonzero"] += int(torch.count_nonzero(after[f"{m}.dense"][~new]))
    # Frozen entries never move between redraws; trainable ones do.
    spans = list(zip(["start0", *(f"after{s}" for s in redraws)], [*(f"before{s}" for s in redraws), f"end{steps}"]))
    for first, last in spans:
        for m in matrices:
            frozen = ~tags[first][f"{m}.mask"]
            assert torch.equal(tags[last][f"{m}.mask"], tags[first][f"{m}.mask"]), m
            assert torch.equal(tags[last][f"{m}.dense"][frozen], tags[first][f"{m}.dense"][frozen]), (m, first)
        moved = sum(int((tags[last][f"{m}.dense"] != tags[first][f"{m}.dense"]).sum()) for m in matrices)
        assert moved > 0, (first, last)
    assert counts["kept"] > 0 and counts["new"] > 0 and counts["frozen_b_nonzero"] > 0, counts
    return counts


# zero3: the adapters are below stage3_param_persistence_threshold, so every rank also keeps them whole, except
# between a checkpoint and the next forward (saving releases them): checkpointed after step 3 only, away from the
# redraws, its run is also the uninterrupted one that a resume across a redraw must match.
SAVE_EVERY = 3


@pytest.fixture(scope="module")
def zero3_redrawn(seed_tiny, tmp_path_factory) -> tuple[Path, dict]:
    out = seed_tiny(tmp_path_factory.mktemp("redrawn"))
    ranks = probed_run(out, "whole", *REDRAWN, f"train.save_every={SAVE_EVERY}")
    return out / "whole", ranks


def test_redraw_keeps_values_and_moves_optimizer_state(zero3_redrawn):
    run, ranks = zero3_redrawn
    assert sorted(metrics(run)) == list(range(1, STEPS + 1))
    counts = check_redraws(ranks, EVERY, STEPS)
    print(f"zero3: {counts}")
    assert counts["whole_copies"] > 0
    # each redraw is a phase of the memory report, with its seconds: what a redraw costs is in plain sight
    for rank in (0, 1):
        lines = [json.loads(line) for line in (run / "memory" / f"rank{rank}.jsonl").read_text().splitlines()]
        redraws = [r for r in lines if r["phase"] == "redraw"]
        assert [r["step"] for r in redraws] == list(range(EVERY + 1, STEPS + 1, EVERY))
        assert all(r["dt"] > 0 for r in redraws)
    report = (run / "memory_report.md").read_text()
    assert "| redraw |" in report


# The offload configs partition the adapters too (threshold 0). Their runs are also the engine's test of each config
# (tests/test_engine.py: the loss goes down, each rank holds half of every partition): one fetches per module, profiles
# two steps and has ratio 0.3, which gives some matrices an odd count, so a partition is padded; the other checkpoints
# two of the four layers (fetched whole, their adapters rebuilt together) and keeps two (fetched per module).
# 12 steps, a redraw every 4: the loss of the last 5 is below that of the first 5.
OFFLOAD_EVERY, OFFLOAD_STEPS = 4, 12
PARTITIONED = "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0"  # no whole copies


@pytest.mark.parametrize("ds_config, extra", [
    ("zero3_offload_optimizer", ["lorasp.ratio=0.3", "deepspeed.fetch=module", "train.profile_steps=[3]"]),
    ("zero3_offload_all", ["deepspeed.fetch=layer", "deepspeed.fetches_in_flight=16", "train.checkpoint_layers=2"]),
])
def test_offload_config_trains_partitions_and_redraws(tiny_out, ds_config, extra):
    ranks = probed_run(tiny_out, ds_config, f"deepspeed.config={ds_config}", f"lorasp.resample_every={OFFLOAD_EVERY}",
                       f"train.max_steps={OFFLOAD_STEPS}", "train.save_every=0", "train.gradient_checkpointing=true",
                       PARTITIONED, *extra)
    counts = check_redraws(ranks, OFFLOAD_EVERY, OFFLOAD_STEPS)
    print(f"{ds_config}: {counts}")
    assert counts["whole_copies"] == 0
    run = tiny_out / ds_config
    check_trains_and_partitions(run, ds_config, OFFLOAD_STEPS, 16 if "deepspeed.fetches_in_flight=16" in extra else 2)
    if "train.profile_steps=[3]" in extra:
        for rank in (0, 1):
            table = (run / "profile" / f"rank{rank}_steps3-4.md").read_text()
            assert "host self-CPU time" in table and "aten::" in table


def test_four_ranks_partition_redraw_and_plan_their_adapter(tiny_out):
    """World size 4 (the 4-GPU scaling run's), on 2 cores: ratio 0.3 pads partitions four ways. Every rank holds a
    quarter of the parameters, the redraws keep every invariant above on all four, and each rank's adapter bytes,
    counted from its tensors, are the plan's for 4 ranks."""
    ranks = probed_run(tiny_out, "four", "deepspeed.config=zero3_offload_all", "lorasp.ratio=0.3",
                       f"lorasp.resample_every={OFFLOAD_EVERY}", f"train.max_steps={OFFLOAD_STEPS}",
                       "train.save_every=0", PARTITIONED, nproc=4)
    counts = check_redraws(ranks, OFFLOAD_EVERY, OFFLOAD_STEPS)
    print(f"4 ranks: {counts}")
    run = tiny_out / "four"
    for rank in range(4):
        part = json.loads((run / "partition" / f"rank{rank}.json").read_text())
        assert part["world_size"] == 4 and 0.24 <= part["param_bytes_local"] / part["param_bytes_total"] <= 0.26
    report = json.loads((run / "memory_report.json").read_text())
    assert report["world_size"] == report["plan"]["world_size"] == 4 and set(report["adapter"]) == {"0", "1", "2", "3"}
    planned = report["plan"]["adapter"]
    for counted in report["adapter"].values():  # gradients: the plan adds the optimizer step's fp32 copy
        assert {k: counted[k] for k in ("params", "frozen", "masks", "optimizer")} == \
            {k: planned[k] for k in ("params", "frozen", "masks", "optimizer")}, (counted, planned)


def test_resume_across_a_redraw_matches_uninterrupted(zero3_redrawn):
    """Stopped after step 4 (masks of round 1, a redraw due before step 5; the last step is always saved) and
    continued to step 6: the same checkpoint and adapter, bit for bit, as one run of 6 steps (the probed one: the
    probe only reads). The schedule is constant, so that max_steps changes no learning rate."""
    whole, _ = zero3_redrawn
    out = whole.parent
    train(out, "resumed", *REDRAWN, f"train.save_every={SAVE_EVERY}", "train.max_steps=4")
    assert ckpt.newest_valid(out / "resumed").step == 4
    resumed = train(out, "resumed", *REDRAWN, f"train.save_every={SAVE_EVERY}")
    a = load_file(ckpt.step_dir(whole, STEPS) / "lorasp.safetensors")
    b = load_file(ckpt.step_dir(resumed, STEPS) / "lorasp.safetensors")
    assert a.keys() == b.keys() and any("frozen_values" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa = load_file(whole / "adapter" / "adapter_model.safetensors")
    pb = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    mw, mr = metrics(whole), metrics(resumed)
    assert [mr[s]["loss"] for s in range(1, STEPS + 1)] == [mw[s]["loss"] for s in range(1, STEPS + 1)]

    # Continued with another lorasp.resample_every, the run would train on masks the checkpoint never held: refused
    # by preflight, before any rank starts (so lorasp train's entry point is called in this process).
    saved = digest(whole / "checkpoints")
    proc = refused_in_process("train.run_name=whole", *REDRAWN, "lorasp.resample_every=3", cwd=out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: train.resume = '{ckpt.step_dir(whole, STEPS)}': its masks are of round 2 at step 6, where "
        "lorasp.resample_every = 3 gives round 1; resume with the run's lorasp.resample_every")
    assert digest(whole / "checkpoints") == saved
