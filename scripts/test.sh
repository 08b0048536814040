#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. Exit status is pytest's; "no tests ran" fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
