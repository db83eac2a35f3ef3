"""Files kept at the top of the repository (ds_configs/, slurm/) that the code reads at run time. A wheel installs
them under <prefix>/share/lorasp-dist/ (pyproject's data-files); a checkout or an editable install reads them in
place, so an edit to a template takes effect without reinstalling."""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def shipped(relative: str) -> Path:
    """The checkout's copy of `relative` if there is one, else the installed one (the checkout's path, for error
    messages, when neither exists)."""
    for root in (CHECKOUT, Path(sys.prefix) / "share" / "lorasp-dist"):
        if (root / relative).exists():
            return root / relative
    return CHECKOUT / relative
