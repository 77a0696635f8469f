#!/usr/bin/env bash
# Creates .venv and installs marketflow with its test extras (idempotent: reinstalls
# only when setup.cfg/pyproject.toml changed). The project has its own venv because its
# top-level `tables` package shadows PyTables' import name.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
stamp=.venv/.marketflow-installed
if [[ ! -f $stamp || setup.cfg -nt $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
  echo "bootstrap: installed marketflow into .venv"
else
  echo "bootstrap: .venv up to date"
fi
