"""`train` stage: data.dir -> models/encoder, metrics/train.json, plots/train (dexml.train.loop).

With train.nproc * train.nnodes > 1 this process launches torchrun, whose workers run this
stage again inside the process group (dexml.train.distributed).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from dexml import paths
from dexml.config import Params
from dexml.errors import DexmlError


def run(params: Params, root: str | Path = ".") -> dict:
    from dexml.train import distributed
    from dexml.train.loop import train

    root = Path(root)
    if not distributed.should_launch(params.train):
        return train(params, root)
    # The workers read the very params this process resolved (overrides included).
    fd, params_file = tempfile.mkstemp(prefix="dexml-train-params-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(params.to_dict(), f, sort_keys=False)
        code = distributed.launch(params.train, params_file, [], cwd=root)
    finally:
        os.unlink(params_file)
    if code != 0:
        raise DexmlError(f"torchrun exited with code {code} (a training process failed; its output is above)")
    return json.loads((root / paths.TRAIN_METRICS).read_text()) if params.train.node_rank == 0 else {}


def summary(metrics: dict) -> str:
    from dexml.train.distributed import is_main_process

    return json.dumps(metrics, indent=2) if metrics and is_main_process() else ""
