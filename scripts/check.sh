#!/usr/bin/env bash
# The project's checks, fastest first: lint, format, types, the guest agent's warning-free
# build, then the test suite (real QEMU guests). CI runs exactly this (via the README's test
# command); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
step() { printf '\n== %s\n' "$*" >&2; }

step "ruff check"
.venv/bin/ruff check src tests benchmarks examples
step "ruff format --check"
.venv/bin/ruff format --check src tests benchmarks examples
step "mypy (src, disallow_untyped_defs)"
.venv/bin/mypy
step "guest agent: clang-format, -Wall -Wextra -Werror"
clang-format --dry-run --Werror src/smolvm/guest/*.c src/smolvm/guest/*.h
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
$PY -c "import sys; from pathlib import Path; from smolvm.guest import build_agent; build_agent(Path(sys.argv[1]) / 'agent')" "$out"
step "pytest"
exec $PY -m pytest -v -ra --durations=25 "$@"
