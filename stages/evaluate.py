"""DVC stage `evaluate`: a thin wrapper over `dexml evaluate` (see dvc.yaml and params.yaml)."""
import sys

from dexml.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
