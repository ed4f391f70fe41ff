"""Progress bars for long work (embedding, searching, tuning, training), one style everywhere.

tqdm on stderr with rates; redrawn every second on a terminal and every 10 s in logs (DVC and
Prefect capture stderr, where a bar per step would flood them). `desc=None` means no bar.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int, desc: str | None, unit: str = "it", disable: bool = False) -> tqdm:
    """A bar to `.update(n)` as work is done (a context manager; closes itself)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=True, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 10.0, disable=disable or desc is None)
