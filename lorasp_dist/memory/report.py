"""`lorasp report RUN_DIR`: measured memory beside the plan, and the cluster total beside a full fine-tune.

Reads `memory/rank*.jsonl` (the tracker's phase lines) and `memory/plan.json` (MemoryPlan.to_dict(), read back
through MemoryPlan.from_dict; optional), writes `memory_report.json`, `memory_report.md`, `memory_timeline.png`,
`memory_vs_full_ft.png` and, with a plan, `memory_components.png` into the run directory.

Units: per-rank memory in GiB (2**30 bytes), the full fine-tune comparison in GB (10**9 bytes), as the ~1 TB figure
is decimal. The JSON holds bytes. The comparison with a full fine-tune is like with like: neither side counts the
runtime a process pays before it holds a tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import MISSING
from pathlib import Path

from lorasp_dist.config import ConfigError
from lorasp_dist.memory.estimate import MemoryPlan
from lorasp_dist.presets import PRESETS

GiB = 2**30
GB = 10**9
PHASE_COLORS = {
    "load": "#8c8c8c", "forward": "#4c9be8", "backward": "#e8a33d", "step": "#5cb85c",
    "checkpoint": "#b279d6", "eval": "#d9534f", "init": "#17becf", "redraw": "#bcbd22",
}
GAP_S = 1.0  # a longer gap between two phases is drawn as a break in the timeline


class ReportError(ConfigError):
    """A run directory the report cannot be written from (one line: the path and what was expected)."""


# --- reading -------------------------------------------------------------------------------------------------------

def read_samples(run_dir: Path) -> dict[int, list[dict]]:
    """rank -> its tracker lines, in file order. A last line cut short by a killed rank is dropped."""
    if not run_dir.is_dir():
        raise ReportError(f"run dir '{run_dir}': not found; expected a run directory holding memory/rank*.jsonl")
    files = sorted((run_dir / "memory").glob("rank*.jsonl"))
    samples: dict[int, list[dict]] = {}
    for f in files:
        m = re.fullmatch(r"rank(\d+)\.jsonl", f.name)
        if not m:
            continue
        text = f.read_text()
        lines = text.splitlines()
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) and not text.endswith("\n"):
                    break
                raise ReportError(f"{f}:{i}: not a JSON line; expected the tracker's phase records") from None
        if records:
            samples[int(m.group(1))] = records
    if not samples:
        raise ReportError(
            f"run dir '{run_dir}': no memory samples; expected memory/rank*.jsonl, written by the tracker in training"
        )
    return dict(sorted(samples.items()))


def read_plan(run_dir: Path) -> MemoryPlan | None:
    path = run_dir / "memory" / "plan.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        why = f"malformed JSON ({e.msg} at line {e.lineno})"
        raise ReportError(f"{path}: {why}; expected MemoryPlan.to_dict()") from None
    required = [k for k, f in MemoryPlan.__dataclass_fields__.items()
                if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in doc] if isinstance(doc, dict) else required
    if missing:
        raise ReportError(f"{path}: missing keys {', '.join(missing)}; expected MemoryPlan.to_dict()")
    return MemoryPlan.from_dict(doc)


def _num(x: float) -> str:
    """1,049.7 for big numbers, three significant digits for small ones (0.0147), so no figure reads as 0.0."""
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}e9" if n >= 1e9 else f"{n / 1e6:.2f}e6" if n >= 1e6 else f"{n:,}"


# --- summarizing ---------------------------------------------------------------------------------------------------

def _peak(values: Iterable[int | None]) -> int | None:
    """Max of the present values; None when all are absent (a CPU run's GPU fields)."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def summarize_rank(records: list[dict]) -> dict:
    """Peaks over the run and per phase. RSS delta = peak minus the baseline of the same session (resume = new one)."""
    phases = [r for r in records if r["phase"] != "baseline"]
    deltas, baseline = [], None
    for r in records:
        if r["phase"] == "baseline":
            baseline = r["host_rss_bytes"]
        elif baseline is not None:
            deltas.append(r["host_rss_peak_bytes"] - baseline)
    by_phase: dict[str, dict] = {}
    for name in dict.fromkeys(r["phase"] for r in phases):  # first-seen order: load, forward, ...
        rs = [r for r in phases if r["phase"] == name]
        by_phase[name] = {
            "count": len(rs),
            "seconds": sum(r.get("dt", 0.0) for r in rs),
            "host_rss_peak_bytes": _peak(r["host_rss_peak_bytes"] for r in rs),
            "cuda_allocated_peak_bytes": _peak(r["cuda_allocated_peak_bytes"] for r in rs),
            "cuda_reserved_peak_bytes": _peak(r["cuda_reserved_peak_bytes"] for r in rs),
            "nvml_used_peak_bytes": _peak(r["nvml_used_peak_bytes"] for r in rs),
        }
    baselines = [r for r in records if r["phase"] == "baseline"]
    return {
        "phases_recorded": len(phases),
        "host_baseline_rss_bytes": baselines[0]["host_rss_bytes"] if baselines else None,
        "host_baseline_shared_bytes": baselines[0].get("host_rss_shared_bytes") if baselines else None,
        "host_rss_peak_bytes": _peak(r["host_rss_peak_bytes"] for r in records),
        "host_rss_delta_bytes": max(deltas) if deltas else None,
        "cuda_allocated_peak_bytes": _peak(r["cuda_allocated_peak_bytes"] for r in phases),
        "cuda_reserved_peak_bytes": _peak(r["cuda_reserved_peak_bytes"] for r in phases),
        "nvml_used_peak_bytes": _peak(r["nvml_used_peak_bytes"] for r in phases),
        "cuda_alloc_retries": _peak(r["cuda_alloc_retries"] for r in records),  # cumulative counters: max = last
        "cuda_ooms": _peak(r["cuda_ooms"] for r in records),
        "phases": by_phase,
    }


def error_pct(measured: float | None, predicted: float | None) -> float | None:
    """(measured - predicted) / predicted * 100: positive means the plan was too low."""
    if measured is None or not predicted:
        return None
    return (measured - predicted) / predicted * 100


def _comparisons(s: dict, plan: MemoryPlan | None) -> list[dict]:
    process_base = plan.host.get("process_base", 0) if plan else 0
    rows = [
        # The baseline is taken after the imports and before loading, so it already holds the process base.
        ("host RSS delta (peak - baseline)", s["host_rss_delta_bytes"],
         plan and plan.host_total - process_base, "host total - process_base"),
        ("host RSS peak (absolute)", s["host_rss_peak_bytes"], plan and plan.host_total, "host total"),
    ]
    staging = plan.host.get("checkpoint_staging", 0) if plan else 0
    outside = _peak(v["host_rss_peak_bytes"] for k, v in s["phases"].items() if k != "checkpoint")
    if staging and outside is not None:  # the plan's host peak is reached while a checkpoint is written
        rows.append(("host RSS peak outside checkpoints", outside, plan.host_total - staging,
                     "host total - checkpoint_staging"))
    if s["cuda_reserved_peak_bytes"] is not None:
        rows.insert(0, ("GPU reserved peak (allocator)", s["cuda_reserved_peak_bytes"],
                        plan and plan.gpu_peak_reserved, "gpu_peak_reserved"))
    if s["nvml_used_peak_bytes"] is not None:
        rows.insert(1, ("GPU used peak (NVML, whole device)", s["nvml_used_peak_bytes"],
                        plan and plan.gpu_total, "gpu_total (all components, CUDA context included)"))
    return [
        {"quantity": q, "measured_bytes": m, "predicted_bytes": p or None, "predicted_as": how,
         "error_pct": error_pct(m, p)}
        for q, m, p, how in rows
    ]


def _num_params(plan: MemoryPlan) -> int | None:
    """The plan's own count; else the preset's (plans written before `counts` existed)."""
    preset = PRESETS.get(plan.preset)
    return plan.counts.get("num_params") or (preset.num_params() if preset else None)


def _cluster(ranks: dict[int, dict], plan: MemoryPlan | None, cuda: bool) -> dict:
    """The run beside a full fine-tune, like with like. The full fine-tune's figure (model states + activations) has
    no runtime term, so the run's side leaves its runtime out too: per rank, the GPU reserved peak (PyTorch's
    allocator: no CUDA or NCCL context) plus the host RSS peak above the baseline (the baseline holds Python, torch
    and the other libraries, before the model). The total with the runtime is given beside it."""
    n = len(ranks)
    gpu = sum(s["cuda_reserved_peak_bytes"] or 0 for s in ranks.values())
    host = sum(s["host_rss_delta_bytes"] or 0 for s in ranks.values())
    total = gpu + host
    # With the runtime: NVML's figure holds the CUDA context (and NCCL), the absolute RSS peak the baseline.
    with_runtime = sum(_peak([s["nvml_used_peak_bytes"], s["cuda_reserved_peak_bytes"]]) or 0 for s in ranks.values())
    with_runtime += sum(s["host_rss_peak_bytes"] or 0 for s in ranks.values())
    per_rank = f"{_num(host / n / GiB)} GiB host above the baseline"
    if cuda:
        per_rank = f"{_num(gpu / n / GiB)} GiB GPU reserved + {per_rank}"
    ranks_word = f"{n} rank{'s' if n != 1 else ''}"
    run_line = (f"this run, runtime left out: {ranks_word} × ({per_rank}, mean per rank) = {_num(total / GiB)} GiB "
                f"= {_num(total / GB)} GB")
    runtime_line = (f"with the runtime (Python, torch and the libraries{', the CUDA and NCCL context' if cuda else ''}"
                    f", {_num((with_runtime - total) / n / GiB)} GiB per rank): {_num(with_runtime / GB)} GB; a full "
                    "fine-tune pays a runtime on each of its ranks too, but its figure counts none, so neither side "
                    "counts it")
    out = {"ranks": n, "gpu_bytes": gpu, "host_bytes": host, "total_bytes": total,
           "total_with_runtime_bytes": with_runtime, "full_ft_bytes": None, "full_ft_breakdown": None,
           "fraction_of_full_ft": None, "num_params": None, "bytes_per_param": None,
           "arithmetic": [run_line, runtime_line]}
    if not plan:
        return out
    full, breakdown = plan.full_ft_bytes, plan.full_ft_breakdown
    activations = sum(v for k, v in breakdown.items() if "activ" in k)
    params = _num_params(plan)
    per_param = (full - activations) / params if params else None
    if params:
        states = full - activations
        ft_line = (f"full fine-tune: {states / params:.3g} B/param × {_count(params)} params = {_num(states / GB)} GB "
                   f"model states + activations {_num(activations / GB)} GB = {_num(full / GB)} GB (no runtime)")
    else:  # a local checkpoint: no preset to count parameters from, so show the model's own terms
        terms = " + ".join(f"{k} {_num(v / GB)} GB" for k, v in breakdown.items()) or "(no breakdown)"
        ft_line = f"full fine-tune: {terms} = {_num(full / GB)} GB (no runtime)"
    fraction = total / full if full else None
    if fraction is not None:
        run_line += f" = {fraction * 100:.1f}% of it"
    out.update(full_ft_bytes=full, full_ft_breakdown=breakdown, fraction_of_full_ft=fraction, num_params=params,
               bytes_per_param=per_param, arithmetic=[ft_line, run_line, runtime_line])
    return out


def build_report(run_dir: str | Path, samples: dict[int, list[dict]] | None = None) -> dict:
    run_dir = Path(run_dir)
    samples = samples if samples is not None else read_samples(run_dir)
    plan = read_plan(run_dir)
    ranks = {r: summarize_rank(recs) for r, recs in samples.items()}
    cuda = any(s["cuda_reserved_peak_bytes"] is not None for s in ranks.values())
    world = max([recs[0].get("world_size") or 0 for recs in samples.values()] + [plan.world_size if plan else 0])
    notes = []
    if plan is None:
        notes.append("no memory/plan.json: measured values only (no prediction, no full fine-tune comparison)")
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        notes.append(f"no samples from ranks {missing} of {world}: the cluster total covers ranks {list(ranks)} only")
    if not cuda:
        notes.append("CPU run: GPU fields are absent (null), not zero; everything lives in host memory")
    if len(ranks) > 1:
        notes.append("host RSS counts pages shared between ranks (libraries, shared memory) once per rank")
    if any(s["nvml_used_peak_bytes"] is not None for s in ranks.values()):
        notes.append("NVML used memory is device-wide: it includes other processes on the same GPU")
    for r, s in ranks.items():
        if s["cuda_ooms"] or s["cuda_alloc_retries"]:
            notes.append(f"rank {r}: {s['cuda_alloc_retries']} allocator retries, {s['cuda_ooms']} OOMs (cumulative)")
    return {
        "run_dir": str(run_dir),
        "units": "bytes; the Markdown shows per-rank memory in GiB (2**30 B) and the full fine-tune in GB (10**9 B)",
        "device": "cuda" if cuda else "cpu",
        "world_size": world,
        "plan": plan.to_dict() if plan else None,
        "predicted_per_rank": {"gpu": plan.gpu, "host": plan.host} if plan else None,
        "ranks": {str(r): {**s, "comparison": _comparisons(s, plan)} for r, s in ranks.items()},
        "cluster": _cluster(ranks, plan, cuda),
        "adapter": read_adapter_inventory(run_dir),
        "notes": notes,
    }


def read_adapter_inventory(run_dir: Path) -> dict[str, dict[str, int]]:
    """{rank: {term: bytes}} from memory/adapter_rank*.json (memory/inventory.py), written after the first step."""
    out = {}
    for f in sorted((run_dir / "memory").glob("adapter_rank*.json")):
        rec = json.loads(f.read_text())
        out[str(rec["rank"])] = rec["bytes"]
    return out


# --- Markdown --------------------------------------------------------------------------------------------------------

def _gib(v: float | None) -> str:
    """Two decimals; small non-zero values (tiny test models) keep two significant digits instead of 0.00."""
    if v is None:
        return "n/a"
    x = v / GiB
    return f"{x:.2f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2g}"


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.2f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f}%"


def _table(head: list[str], rows: list[list], right: list[int] | None = None) -> list[str]:
    """A Markdown table; numeric columns (`right`, default all but the first) are right-aligned."""
    right = list(range(1, len(head))) if right is None else right
    align = ["---:" if i in right else "---" for i in range(len(head))]
    return [f"| {' | '.join(head)} |", f"|{'|'.join(align)}|", *(f"| {' | '.join(map(str, r))} |" for r in rows), ""]


def render_markdown(report: dict, charts: list[str]) -> str:
    plan, ranks, cluster = report["plan"], report["ranks"], report["cluster"]
    cuda = report["device"] == "cuda"
    md = [f"# Memory report: {Path(report['run_dir']).name}", "",
          "Units: per-rank memory in **GiB** (2^30 bytes); the full fine-tune comparison in **GB** (10^9 bytes).",
          f"Device: {report['device'].upper()}, {len(ranks)} rank(s) measured of world size {report['world_size']}."
          + (f" Plan: {'preset' if plan.get('preset') in PRESETS else 'checkpoint'} `{plan.get('preset')}`, "
             f"`{plan.get('ds_config')}`, micro-batch {plan.get('micro_batch')}"
             f", seq len {plan.get('seq_len')}, gradient checkpointing {plan.get('gradient_checkpointing')}"
             f", variant `{plan.get('variant')}`." if plan else ""), ""]

    md += ["## Cluster total against a full fine-tune", "", *(f"- {line}" for line in cluster["arithmetic"]), ""]

    md += ["## Per rank: measured beside predicted", "",
           "Error % = (measured − predicted) / predicted × 100; positive means the plan was too low.", ""]
    rows = [[r, c["quantity"], _gib(c["measured_bytes"]), _gib(c["predicted_bytes"]),
             c["predicted_as"] if plan else "n/a", _pct(c["error_pct"])]
            for r, s in ranks.items() for c in s["comparison"]]
    md += _table(["rank", "quantity", "measured (GiB)", "predicted (GiB)", "predicted as", "error"], rows,
                 right=[0, 2, 3, 5])
    base = "; ".join(f"rank {r} {_gib(s['host_baseline_rss_bytes'])} GiB" + (
        f" ({_gib(s['host_baseline_shared_bytes'])} of it shared: libraries' pages, sized by the page cache)"
        if s.get("host_baseline_shared_bytes") is not None else "") for r, s in ranks.items())
    md += [f"Baseline RSS (after the imports, before the model was loaded): {base}.", ""]

    if plan:
        md += ["## Predicted per component (per rank)", "",
               "The tracker measures peaks per *phase*, not per component: the measured side is the per-rank totals "
               "above and the phase peaks below. This table is the plan alone.", ""]
        sides = [("GPU", plan["gpu"], plan.get("gpu_total")), ("host", plan["host"], plan["host_total"])][not cuda:]
        names = dict.fromkeys(k for _, part, _ in sides for k, v in part.items() if v)
        rows = [[name, *(_gib(part[name]) if part.get(name) else "" for _, part, _ in sides)] for name in names]
        rows.append(["**total**", *(f"**{_gib(total)}**" for _, _, total in sides)])
        md += _table(["component", *(f"{side} (GiB)" for side, _, _ in sides)], rows)
        if cuda:
            md += [f"Predicted GPU peak reserved by the allocator: {_gib(plan['gpu_peak_reserved'])} GiB.", ""]

    if report.get("adapter"):
        md += ["## Adapter bytes per rank: counted beside predicted", "",
               "Counted from the tensors the rank holds after its first step (memory/inventory.py), GPU and host. "
               "`gradients` counts the gradient partition; the plan adds the fp32 copy the optimizer step makes "
               "of one sub-group's gradients, which lasts only for the step.", ""]
        predicted = plan.get("adapter", {}) if plan else {}
        terms = list(next(iter(report["adapter"].values())))
        rows = [[r, *(_mib(held[t]) for t in terms), _mib(sum(held.values()))]
                for r, held in report["adapter"].items()]
        if predicted:
            rows.append(["plan", *(_mib(predicted.get(t)) for t in terms), _mib(sum(predicted.values()))])
        md += _table(["rank", *(f"{t} (MiB)" for t in terms), "total (MiB)"], rows, right=list(range(len(terms) + 2)))

    md += ["## Measured peaks per phase (GiB)", ""]
    keys = {"host_rss_peak_bytes": "host RSS peak"}
    if cuda:
        keys.update(cuda_allocated_peak_bytes="GPU allocated peak", cuda_reserved_peak_bytes="GPU reserved peak",
                    nvml_used_peak_bytes="NVML used peak")
    rows = [[r, name, p["count"], f"{p['seconds']:.2f}", *(_gib(p[k]) for k in keys)]
            for r, s in ranks.items() for name, p in s["phases"].items()]
    md += _table(["rank", "phase", "times", "seconds", *keys.values()], rows, right=[0, 2, 3, *range(4, 4 + len(keys))])

    if cluster["full_ft_breakdown"]:
        rows = [[k, _num(v / GB)] for k, v in cluster["full_ft_breakdown"].items()]
        rows.append(["**total**", f"**{_num(cluster['full_ft_bytes'] / GB)}**"])
        md += ["## Full fine-tune breakdown (GB)", "", *_table(["term", "GB"], rows)]

    md += ["## Charts", "", *(f"![{c}]({c})" for c in charts), ""]
    if report["notes"]:
        md += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    return "\n".join(md)


# --- charts ----------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(samples: dict[int, list[dict]], path: Path) -> None:
    """Memory per rank over time, one step per phase at its peak; phases shaded (from the lowest rank's phases)."""
    plt = _pyplot()
    cuda = any(r["cuda_reserved_peak_bytes"] is not None for recs in samples.values() for r in recs)
    t0 = min(r.get("wall", r["t"]) - r.get("dt", 0.0) for recs in samples.values() for r in recs)
    panels = [("cuda_reserved_peak_bytes", "GPU reserved peak (GiB)")] if cuda else []
    panels.append(("host_rss_peak_bytes", "host RSS peak (GiB)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels) + 0.8), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        for rank, recs in samples.items():
            xs, ys, base = [], [], []
            for r in recs:
                if r[key] is None:
                    continue
                end = r.get("wall", r["t"]) - t0
                if r["phase"] == "baseline":
                    base.append((end, r[key] / GiB))
                    continue
                start = end - r.get("dt", 0.0)
                if xs and start - xs[-1] > GAP_S:  # time outside any phase was not measured: leave it blank
                    xs.append(float("nan")), ys.append(float("nan"))
                xs += [start, end]
                ys += [r[key] / GiB] * 2
            (line,) = ax.plot(xs, ys, lw=1.6, label=f"rank {rank}")
            if base:
                ax.plot(*zip(*base), "o", color=line.get_color(), ms=5)
        first = next(iter(samples.values()))
        for name in dict.fromkeys(r["phase"] for r in first if r["phase"] != "baseline"):
            spans = [(r.get("wall", r["t"]) - t0 - r.get("dt", 0.0), r.get("dt", 0.0))
                     for r in first if r["phase"] == name]
            ax.broken_barh(spans, (0, 1), transform=ax.get_xaxis_transform(), alpha=0.15,
                           color=PHASE_COLORS.get(name, "#cccccc"), label=name)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9, title="rank / phase")
    axes[-1, 0].set_xlabel(f"time since the first sample (s); phases shaded as rank {next(iter(samples))} ran them")
    axes[0, 0].set_title("Memory per rank over the run (peak within each phase; dot: baseline before loading)")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)  # figures are not freed by going out of scope


def plot_vs_full_ft(report: dict, path: Path) -> None:
    """Two horizontal bars to scale: a full fine-tune of the same model, and this run's cluster total, in GB; neither
    counts the runtime (see _cluster)."""
    plt = _pyplot()
    c, plan = report["cluster"], report["plan"]
    fig, ax = plt.subplots(figsize=(11, 3.4))
    rows = []
    if c["full_ft_bytes"]:
        act = sum(v for k, v in (c["full_ft_breakdown"] or {}).items() if "activ" in k)
        per_param = f"{c['bytes_per_param']:.3g} B/param" if c["bytes_per_param"] else "model states"
        rows.append((f"full fine-tune\n({per_param} + activations)",
                     [(c["full_ft_bytes"] - act, "model states", "#d9534f"), (act, "activations", "#f0ad4e")]))
    rows.append(("this run\n(cluster total, all ranks,\nruntime left out)",
                 [(c["gpu_bytes"], "GPU reserved", "#4c9be8"), (c["host_bytes"], "host above baseline", "#5cb85c")]))
    top = max(sum(v for v, _, _ in parts) for _, parts in rows) / GB
    for y, (_, parts) in enumerate(reversed(rows)):
        left = 0.0
        for v, name, color in parts:
            if v:  # a CPU run has no GPU part: no empty legend entry for it
                ax.barh(y, v / GB, left=left, color=color, label=name, height=0.55)
                left += v / GB
        text = f" {_num(left)} GB"
        if y == 0 and len(rows) == 2:  # the bottom bar is this run
            text += f"\n ({c['fraction_of_full_ft'] * 100:.1f}% of the full fine-tune)"
        ax.text(left, y, text, va="center", ha="left", fontsize=10, fontweight="bold")
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)])
    ax.set_xlim(0, top * 1.35)  # room for the value written after the longer bar
    ax.set_xlabel("memory (GB, 10^9 bytes), drawn to scale")
    model = plan.get("preset") if plan else None
    ax.set_title(f"{model or 'this model'}: this run against a full fine-tune of the same model"
                 if c["full_ft_bytes"] else "this run (no plan.json: full fine-tune cost unknown)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_components(report: dict, path: Path) -> None:
    """Predicted bytes per component (per rank) beside the measured per-rank peaks, GPU and host side by side."""
    plt = _pyplot()
    plan, ranks = report["plan"], report["ranks"]
    sides = [("host", "host", plan["host_total"], "host_rss_peak_bytes", "measured RSS peak")]
    if report["device"] == "cuda":
        sides.insert(0, ("gpu", "GPU", plan["gpu_peak_reserved"], "cuda_reserved_peak_bytes", "measured reserved peak"))
    fig, axes = plt.subplots(1, len(sides), figsize=(6.5 * len(sides), 5.5), squeeze=False)
    for ax, (key, title, total, measured_key, measured_label) in zip(axes[0], sides):
        comps = {k: v for k, v in plan[key].items() if v}
        labels = list(comps) + [f"predicted total{' reserved' if key == 'gpu' else ''}"]
        values = [v / GiB for v in comps.values()] + [total / GiB]
        colors = ["#9ab7d3"] * len(comps) + ["#2f6ea5"]
        for r, s in ranks.items():
            labels.append(f"{measured_label}, rank {r}")
            values.append((s[measured_key] or 0) / GiB)
            colors.append("#e8a33d")
        ys = range(len(labels))[::-1]
        ax.barh(list(ys), values, color=colors)
        ax.set_yticks(list(ys), labels, fontsize=9)
        for y, v in zip(ys, values):
            ax.text(v, y, f" {_gib(v * GiB)}", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.2 or 1)
        ax.set_xlabel("GiB per rank")
        ax.set_title(f"{title}: predicted per component vs measured")
        ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


# --- entry point -----------------------------------------------------------------------------------------------------

def write_report(run_dir: str | Path) -> list[Path]:
    """Write the JSON, Markdown and PNG report into RUN_DIR; returns the written paths (the JSON first)."""
    run_dir = Path(run_dir)
    samples = read_samples(run_dir)
    report = build_report(run_dir, samples)
    charts = [run_dir / "memory_timeline.png", run_dir / "memory_vs_full_ft.png"]
    plot_timeline(samples, charts[0])
    plot_vs_full_ft(report, charts[1])
    if report["plan"]:
        charts.append(run_dir / "memory_components.png")
        plot_components(report, charts[2])
    json_path, md_path = run_dir / "memory_report.json", run_dir / "memory_report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report, [c.name for c in charts]))
    return [json_path, md_path, *charts]
