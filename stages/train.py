"""DVC stage `train`: a thin wrapper over `dexml train` (see dvc.yaml and params.yaml)."""
import sys

from dexml.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
