#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs xmctag with the CPU runtime, test tools and Ray (for the Ray engine's
# tests): pip install -e ".[cpu,dev,ray]".
# Idempotent: a second run only re-checks the install. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[cpu,dev,ray]"
