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
# Headless Chromium for tests/test_run_output.py (each run's report.html checked in a real browser):
# installed once, as root with apt-get, only when missing.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (headless browser for the run-report test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup] chromium is missing and cannot be installed here (needs root + apt-get): tests/test_run_output.py will fail" >&2
  fi
fi
