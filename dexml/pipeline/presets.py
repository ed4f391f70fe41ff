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


# The two largest benchmarks train with the label cache (docs/negatives.md): every label still in
# every step's loss, but only the positives and the hardest cached negatives re-encoded with
# gradients. Refresh interval: on LF-DebianTags at lr 2e-4, 50 steps trained a better model than 20
# at half the refresh cost (the table drifts as far in 20 steps as in 50); Adam moves the weights
# about lr per step, so the interval scales with 1/lr: ~33 steps at 3e-4, ~140 at 7e-5.
_CACHED = {"negatives.mode": "cached", "negatives.num_hard": 4, "negatives.num_random": 0}

PRESETS: dict[str, dict] = {
    "EURLex-4K": _preset("EURLex-4K", 128, 512, 5e-5, 0.05, True),
    "LF-AmazonTitles-131K": _preset("LF-AmazonTitles-131K", 32, 3000, 3e-4, 0.05, True),
    "LF-AmazonTitles-1.3M": {**_preset("LF-AmazonTitles-1.3M", 32, 3000, 3e-4, 1.0, False), **_CACHED,
                             "negatives.refresh_steps": 33},
    "LF-Wikipedia-500K": {**_preset("LF-Wikipedia-500K", 128, 768, 7e-5, 1.0, False, "title+content"), **_CACHED,
                          "negatives.refresh_steps": 140},
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
    apply_to_file(args.params, overrides)
    print(f"preset {args.name} written to {args.params}", file=sys.stderr)
    return 0


def _yaml11_float(representer, value: float):
    """Floats the way YAML 1.1 readers (PyYAML, which loads params.yaml) parse back as floats:
    `5.0e-05`, never `5e-05` (a string to them)."""
    text = repr(float(value))
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def apply_to_file(params_file, overrides: dict) -> None:
    """Write `overrides` (dotted keys) into a params file, keeping its comments and layout
    (ruamel.yaml round trip, installed with DVC); atomic."""
    import io

    from ruamel.yaml import YAML

    from dexml import fileio

    yaml_rt = YAML()  # round-trip mode: comments, key order and quoting survive
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # never re-wrap long lines
    yaml_rt.representer.add_representer(float, _yaml11_float)
    yaml_rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    with open(params_file, encoding="utf-8") as f:
        doc = yaml_rt.load(f)
    for key, value in overrides.items():
        set_dotted(doc, key, value)
    out = io.StringIO()
    yaml_rt.dump(doc, out)
    fileio.write_text(params_file, out.getvalue())
