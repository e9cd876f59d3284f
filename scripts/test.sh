#!/usr/bin/env bash
# Installs everything (scripts/install.sh) and runs the whole test suite on the local data copies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --with-qwen=0.5b   # the Qwen2 family's real-weight tests run on Qwen2.5-Coder-0.5B
if [ -z "${SELFPRUNE_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export SELFPRUNE_DATA_DIR="$(cd ../shared/data && pwd)"
fi
# -rs lists every skip with its reason; under CI=true a skip is a failure (tests/conftest.py).
exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@"
