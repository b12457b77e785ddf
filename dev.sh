#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.10+ and pip, nothing else):
#   ./dev.sh demo    set up .venv, then make a small MoE, compress it, inspect it, and run it
#   ./dev.sh test    set up .venv (if needed), then run the whole test suite
#   ./dev.sh bench   set up .venv (if needed), then run the benchmarks into docs/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MOEPACK_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c "import moepack, torch, transformers, pytest" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
    "$PY" -m pip install -q "torch==${MOEPACK_TORCH_VERSION:-2.13.0}"
    "$PY" -m pip install -q -e ".[dev,bench]"
  fi
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/just" demo "$@" ;;
  test)
    setup
    exec "$VENV/bin/just" test "$@" ;;
  bench)
    setup
    exec "$VENV/bin/just" bench "$@" ;;
  *) echo "usage: ./dev.sh demo|test|bench|setup" >&2; exit 2 ;;
esac
