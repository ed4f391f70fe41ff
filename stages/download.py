"""DVC stage `download`: a thin wrapper over `dexml download` (see dvc.yaml and params.yaml)."""
import sys

from dexml.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))
