#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash run.sh pipeline   set up .venv and run the default pipeline (dvc repro)
#   bash run.sh test       set up .venv (with test extras) and run the whole test suite
# DEXML_VENV picks another virtual environment (CI uses a fresh one).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${DEXML_VENV:-.venv}
export PATH="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")/bin:$PATH"  # dvc stages call `python`
export DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=False PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

setup() {
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  # torch first, pinned to the CPU build: a bare `torch` requirement would pull a CUDA build
  # of several GB. GPU machines: install a CUDA torch first, then `pip install -e .[gpu]`.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
}

case "${1:-}" in
  pipeline)
    setup cpu
    "$VENV/bin/dvc" repro
    "$VENV/bin/dvc" metrics show
    ;;
  test)
    setup cpu,test
    shift
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
    ;;
  *)
    echo "usage: bash run.sh pipeline | test [pytest args]" >&2
    exit 2
    ;;
esac
