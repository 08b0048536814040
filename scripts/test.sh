#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. Exit status is pytest's; "no tests ran" fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
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
exec .venv/bin/python -m pytest "$@"
