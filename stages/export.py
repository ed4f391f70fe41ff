"""DVC stage `export`: a thin wrapper over `dexml export` (see dvc.yaml and params.yaml)."""
import sys

from dexml.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
