"""The `dexml` command: parse the arguments and params once, then hand them down.

Stage commands (one per DVC stage) call `run(params, root)` of their module in
dexml.pipeline and print its `summary(result)`. Tool commands (predict, promote, rollback,
preset, serve) provide `add_arguments(parser)` and `main(args, params)`; params are loaded for the
tools that need them. Modules are imported lazily, so e.g. `dexml predict` never imports torch.
No module under dexml/ imports this one.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from dexml.config import load_params, parse_overrides
from dexml.errors import EXIT_ERROR, EXIT_TRANSIENT, DexmlError, TransientError


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    stage: bool = False  # a DVC stage: run(params, root) + summary(result)
    params: bool = False  # a tool that needs the params file
    prefix: str = ""  # a tool module serving several commands: add_<prefix>arguments / <prefix>main


COMMANDS = {
    "download": Command("dexml.pipeline.download", "materialise the dataset selected in params.yaml under data.dir", stage=True),
    "validate": Command("dexml.pipeline.validate", "check the dataset with great-expectations; write statistics", stage=True),
    "train": Command("dexml.pipeline.train", "train the dual encoder", stage=True),
    "export": Command("dexml.pipeline.export", "export the encoder(s) to ONNX into the bundle", stage=True),
    "index": Command("dexml.pipeline.index", "embed all labels with the ONNX encoder and build the faiss index", stage=True),
    "evaluate": Command("dexml.pipeline.evaluate", "score the test split with the bundle; write metrics and plots", stage=True),
    "predict": Command("dexml.serve.predictor", "top labels for texts, from a bundle (no torch)"),
    "preset": Command("dexml.pipeline.presets", "print (or --apply) the paper's settings for one of its datasets"),
    "promote": Command("dexml.pipeline.promote", "gate a candidate bundle against production and promote it",
                       params=True, prefix="promote_"),
    "rollback": Command("dexml.pipeline.promote", "restore the previous production bundle", prefix="rollback_"),
    "serve": Command("dexml.serve.server", "serve a bundle over HTTP, following promotions and rollbacks (no torch)",
                     params=True),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {n:<{width}}  {c.help}" for n, c in COMMANDS.items()]
    return ("usage: dexml COMMAND [--params params.yaml] [-S key=value ...] [options]\n\ncommands:\n"
            + "\n".join(lines) + "\n\n`dexml COMMAND --help` for a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        print(_usage(), file=sys.stdout if name is None else sys.stderr)
        if name is not None:
            print(f"dexml: error: unknown command {name!r}", file=sys.stderr)
        return 0 if name is None and argv and argv[0] in ("-h", "--help") else 2
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"dexml {name}", description=command.help)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                        help="override a params entry for this run, e.g. -S train.epochs=1")
    try:
        module = importlib.import_module(command.module)
        add = getattr(module, f"add_{command.prefix}arguments", None)
        if add is not None:
            add(parser)
        rest = list(argv)
        rest.remove(name)
        args = parser.parse_args(rest)
        params = (load_params(args.params, parse_overrides(args.set))
                  if command.stage or command.params else None)
        if command.stage:
            text = module.summary(module.run(params, "."))
            if text:
                print(text)
            return 0
        return int(getattr(module, f"{command.prefix}main")(args, params) or 0)
    except DexmlError as e:
        print(f"dexml {name}: error: {e}", file=sys.stderr)
        return EXIT_TRANSIENT if isinstance(e, TransientError) else EXIT_ERROR
    except BrokenPipeError:  # the reader went away (`dexml predict ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
