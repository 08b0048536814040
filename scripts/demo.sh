#!/usr/bin/env bash
# Install pathray into ./.venv (first time: a few minutes), then run the embedding job on the
# bundled demo (synthetic slides + the real CMU-1-Small-Region slide) on a local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pathray demo "$@"
