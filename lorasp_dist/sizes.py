"""Memory sizes as people write them ("80GiB", "24GB") and as the code uses them (bytes).

The config parses a size once, when it is validated (config.Size); everything after it holds bytes. A number
without a unit is refused: `--gpu-mem 24` means 24 GiB to a person and 24 bytes to a parser.
"""

from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB,
}
_BY_LOWER = {u.lower(): n for u, n in UNITS.items()}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
ACCEPTED = (
    "a number with a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), "
    "e.g. 80GiB, 24GB, 1.5TiB"
)


def parse_size(text: object) -> int:
    """"80GiB", "24 GB", "512MiB", "1.5TiB", "4096B" -> bytes; a ValueError naming what is accepted otherwise."""
    m = _SIZE_RE.match(text) if isinstance(text, str) else None
    unit = _BY_LOWER.get(m.group(2).lower()) if m else None
    if unit is None:
        raise ValueError(f"not a memory size; accepted: {ACCEPTED}")
    return round(float(m.group(1)) * unit)


def format_size(n: int) -> str:
    """Bytes -> the unit that writes them exactly with the smallest number ("80GiB", "24GB", "1536GiB", "1000001B"):
    parse_size's inverse, so a config written back to YAML reads as it was given."""
    exact = [(n // size, unit) for unit, size in UNITS.items() if n >= size and n % size == 0]
    count, unit = min(exact, default=(n, "B"))
    return f"{count}{unit}"
