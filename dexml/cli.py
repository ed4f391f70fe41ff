"""The `dexml` command. Each subcommand is exactly what its DVC stage runs.

A subcommand lives in the module named below, which provides `add_arguments(parser)`
(optional) and `main(args) -> int | None`. Modules are imported lazily so that, e.g.,
`dexml predict` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from dexml.errors import DexmlError

COMMANDS = {
    "download": ("dexml.download", "materialise the dataset selected in params.yaml under data.dir"),
    "validate": ("dexml.validate", "check the dataset with great-expectations; write statistics"),
    "train": ("dexml.train", "train the dual encoder"),
    "export": ("dexml.export", "export the encoder(s) to ONNX into the bundle"),
    "index": ("dexml.index", "embed all labels with the ONNX encoder and build the faiss index"),
    "evaluate": ("dexml.evaluate", "score the test split with the bundle; write metrics and plots"),
    "predict": ("dexml.predict", "top labels for texts, from a bundle (no torch)"),
    "preset": ("dexml.presets", "print (or --apply) the paper's settings for one of its datasets"),
    "promote": ("dexml.promote", "gate a candidate bundle against production and promote it"),
    "rollback": ("dexml.promote", "restore the previous production bundle"),
}


def parse_overrides(items: list[str] | None) -> dict:
    """`-S train.lr=1e-4` -> {"train.lr": 0.0001} (values parsed as YAML scalars)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise DexmlError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_params_from_args(args):
    from dexml.config import load_params

    return load_params(args.params, parse_overrides(args.set))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the chosen subcommand's module (lazy imports keep `predict` torch-free).
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
        print("usage: dexml COMMAND [--params params.yaml] [-S key=value ...] [options]\n\n"
              "commands:\n" + "\n".join(lines) + "\n\n`dexml COMMAND --help` for a command's options.",
              file=sys.stdout if name is None else sys.stderr)
        if name is not None:
            print(f"dexml: error: unknown command {name!r}", file=sys.stderr)
        return 0 if name is None and argv and argv[0] in ("-h", "--help") else 2
    module_name, help_ = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"dexml {name}", description=help_)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                        help="override a params entry for this run, e.g. -S train.epochs=1")
    try:
        mod = importlib.import_module(module_name)
        add = getattr(mod, f"add_{name}_arguments", None) or getattr(mod, "add_arguments", None)
        if add is not None:
            add(parser)
        rest = list(argv)
        rest.remove(name)
        args = parser.parse_args(rest)
        entry = getattr(mod, f"{name}_main", None) or getattr(mod, "main")
        return int(entry(args) or 0)
    except DexmlError as e:
        print(f"dexml {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
