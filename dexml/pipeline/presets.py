"""The paper's settings for its four benchmarks (Gupta et al., ICLR 2024), as params overrides.

    dvc exp run $(dexml preset LF-AmazonTitles-131K)      # one experiment with the preset
    dexml preset LF-AmazonTitles-131K --apply             # write it into params.yaml

They need a GPU (bf16, batches of 512-3000 with all-label negatives) and the internet (the
dataset download and `distilbert-base-uncased` from the hub).
"""
from __future__ import annotations

import sys

import yaml

from dexml.config import load_params, set_dotted
from dexml.errors import ConfigError

_COMMON = {
    "model.encoder": "distilbert-base-uncased",
    "model.pooling": "cls",
    "model.shared": True,
    "model.projection": None,
    "loss.name": "decoupled_softmax",
    "negatives.mode": "all",
    "train.sample_positives": 1,
    "train.weight_decay": 0.01,
    "train.warmup": 0.1,
    "train.amp": "bf16",
    "train.epochs": 100,
    "data.label_text": "title",
}


def _preset(source: str, max_len: int, batch: int, lr: float, tau: float, normalize: bool,
            query_text: str = "title") -> dict:
    return {**_COMMON, "dataset.source": source, "model.query_max_len": max_len,
            "model.label_max_len": max_len, "train.batch_size": batch, "train.lr": lr,
            "model.tau": tau, "model.normalize": normalize, "data.query_text": query_text}


PRESETS: dict[str, dict] = {
    "EURLex-4K": _preset("EURLex-4K", 128, 512, 5e-5, 0.05, True),
    "LF-AmazonTitles-131K": _preset("LF-AmazonTitles-131K", 32, 3000, 3e-4, 0.05, True),
    "LF-AmazonTitles-1.3M": _preset("LF-AmazonTitles-1.3M", 32, 3000, 3e-4, 1.0, False),
    "LF-Wikipedia-500K": _preset("LF-Wikipedia-500K", 128, 768, 7e-5, 1.0, False, "title+content"),
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def as_set_args(overrides: dict) -> list[str]:
    """`-S key=value` arguments for `dvc exp run` / `dexml <stage>` (values as YAML scalars)."""
    out = []
    for key, value in overrides.items():
        out += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return out


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=sorted(PRESETS), help="the paper dataset whose settings to use")
    parser.add_argument("--apply", action="store_true",
                        help="write the preset into the params file instead of printing -S arguments")


def main(args, params=None) -> int:
    overrides = get_preset(args.name)
    load_params(args.params, overrides)  # validate before printing or writing anything
    if not args.apply:
        print(" ".join(as_set_args(overrides)))
        return 0
    from dexml import fileio

    with open(args.params) as f:
        raw = yaml.safe_load(f) or {}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    fileio.write_text(args.params, yaml.safe_dump(raw, sort_keys=False))
    print(f"preset {args.name} written to {args.params}", file=sys.stderr)
    return 0
