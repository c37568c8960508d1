#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs xmctag with the CPU runtime and test tools: pip install -e ".[cpu,dev]".
# Idempotent: a second run only re-checks the install. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[cpu,dev]"
