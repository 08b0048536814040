#!/usr/bin/env bash
# Create ./.venv and install pathray (editable, with test and benchmark extras) at known-good versions.
# Idempotent: a stamp of pyproject.toml + constraints.txt skips the install when unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/.pathray-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing pathray and its dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
  echo "$stamp" > .venv/.pathray-stamp
fi
