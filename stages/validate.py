"""DVC stage `validate`: a thin wrapper over `dexml validate` (see dvc.yaml and params.yaml)."""
import sys

from dexml.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
