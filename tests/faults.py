"""The fault table: each fault test records what the fault cost, and the test run writes `tests/FAULTS.md`.

A row is keyed by the fault's name, so a partial run (`pytest -k ...`) updates its own rows and keeps the others.
`faults.json` beside the table holds the rows as data; both files are written by the tests, never by hand.
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA, TABLE = HERE / "faults.json", HERE / "FAULTS.md"
_rows: dict[str, dict] = {}


def record(fault: str, *, entry: str, exit_code: int | None, steps_lost: int, data_lost: bool, outcome: str) -> None:
    """One injected fault: which entry point took it, its exit code, the steps that had to be redone (work since the
    last checkpoint, or the whole run) and whether anything already written (checkpoint, adapter, metrics) was lost."""
    _rows[fault] = {"entry": entry, "exit_code": exit_code, "steps_lost": steps_lost, "data_lost": data_lost,
                    "outcome": outcome, "date": time.strftime("%Y-%m-%d")}


def write() -> None:
    if not _rows:
        return
    with open(DATA, "a+") as data:  # locked: each pytest-xdist worker merges its own rows in turn
        fcntl.flock(data, fcntl.LOCK_EX)
        data.seek(0)
        rows = json.loads(data.read() or "{}")
        rows.update(_rows)
        data.truncate(0)
        data.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")
        _write_table(rows)


def _write_table(rows: dict[str, dict]) -> None:
    lines = [
        "# Fault table",
        "",
        "Written by the test run (`tests/faults.py`), one row per injected fault: what it cost.",
        "Target: nothing lost, at most one checkpoint interval redone.",
        "",
        "| fault | entry point | exit code | steps redone | data lost | what happened | run |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for fault, r in sorted(rows.items()):
        lost = "**yes**" if r["data_lost"] else "no"
        code = "" if r["exit_code"] is None else r["exit_code"]
        lines.append(f"| {fault} | {r['entry']} | {code} | {r['steps_lost']} | {lost} | {r['outcome']} | {r['date']} |")
    TABLE.write_text("\n".join(lines) + "\n")
