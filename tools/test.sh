#!/usr/bin/env bash
# The project's test command: sets up .venv (CPU torch, pinned) if needed, then lint + tests.
# Usage: bash tools/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-test.txt
.venv/bin/python -m ruff check .
# pytest exits 5 when it collects nothing; with set -e that fails the run, as it must.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False \
    .venv/bin/python -m pytest "$@"
