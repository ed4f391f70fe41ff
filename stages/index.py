"""DVC stage `index`: a thin wrapper over `dexml index` (see dvc.yaml and params.yaml)."""
import sys

from dexml.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
