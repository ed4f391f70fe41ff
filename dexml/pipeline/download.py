"""`download` stage: the dataset selected by params `dataset`, materialised under `data.dir`
(dexml.data.download: sources, fetching, conversion, atomic replacement)."""
from __future__ import annotations

import time
from pathlib import Path

from dexml.config import Params
from dexml.data.download import log, materialise


def run(params: Params, root: str | Path = ".") -> dict:
    root = Path(root)
    start = time.time()
    out = materialise(params.dataset, root / params.data.dir, root / "cache" / "downloads")
    return {"dataset": str(out), "seconds": round(time.time() - start, 1)}


def summary(result: dict) -> str:
    log(f"done in {result['seconds']} s")
    return ""
