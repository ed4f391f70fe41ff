"""Shared fixtures: a tiny random BERT (packaged tokenizer) and a tiny synthetic dataset."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DVC stages run `python stages/...`: make that the interpreter running the tests.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

REPO = Path(__file__).resolve().parents[1]

TINY_SYNTHETIC = {"num_labels": 40, "num_train": 400, "num_test": 100, "words_per_label": 4,
                  "labels_per_point": 2.0, "query_words": 6, "noise_fraction": 0.2, "seed": 0}


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    from dexml.train.model import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the canonical LF layout (do not modify: shared)."""
    from dexml.config import SyntheticParams
    from dexml.data.dataset import write_dataset
    from dexml.data.synthetic import generate

    out = tmp_path_factory.mktemp("tiny_dataset") / "data"
    write_dataset(generate(SyntheticParams(**TINY_SYNTHETIC)), out)
    return out


@pytest.fixture
def tiny_params(tiny_encoder):
    """A params dict for a fast CPU run with the tiny encoder; tests edit their own copy."""

    def make(**sections) -> dict:
        raw = {
            "dataset": {"source": "synthetic", "synthetic": dict(TINY_SYNTHETIC)},
            "model": {"encoder": str(tiny_encoder), "tau": 0.1, "query_max_len": 16, "label_max_len": 12},
            "negatives": {"mode": "all", "label_chunk": 16},
            "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "seed": 0, "warmup": 0.0},
            "evaluate": {"k": 10},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(copy.deepcopy(values))
        return raw

    return make


def write_heldout_rows(root: Path, data_dir: Path, fraction: float = 0.1) -> None:
    """What the train stage writes beside its model: the training rows it held out (for tests that
    build a model without training it)."""
    import numpy as np

    from dexml import fileio, paths
    from dexml.data.dataset import read_dataset, split_validation

    n = len(read_dataset(data_dir).trn)
    rows = split_validation(np.random.default_rng(0), n, fraction, 2000)[0]
    fileio.write_json(Path(root) / paths.HELDOUT_ROWS, {"num_train": n, "rows": rows.tolist()})
