"""`validate` stage: the great-expectations suite over data.dir (dexml.data.validate); the
report to reports/validation.json and, when it passes, the statistics to metrics/data.json."""
from __future__ import annotations

import time
from pathlib import Path

from dexml import paths
from dexml.config import Params
from dexml.data.validate import validate_dataset


def run(params: Params, root: str | Path = ".") -> dict:
    root = Path(root)
    start = time.time()
    stats = validate_dataset(root / params.data.dir, root / paths.VALIDATION_REPORT, root / paths.DATA_METRICS)
    return {"dir": params.data.dir, "stats": stats, "seconds": round(time.time() - start, 1)}


def summary(result: dict) -> str:
    stats = result["stats"]
    return (f"[validate] {result['dir']}: {stats['trn']['points']} train / {stats['tst']['points']} "
            f"test points, {stats['labels']} labels, {stats['trn']['empty_rows']} train rows without "
            f"labels; passed in {result['seconds']} s")
