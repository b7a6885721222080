#!/usr/bin/env bash
# Bootstrap if needed, then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
BOOTSTRAP_EXTRAS="test"  # no test imports trl, so the bench extra is not needed here
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
# The report's test opens it in a real headless browser: Debian's chromium package, installed here when
# missing and we are root (elsewhere that test is skipped with its reason; on CI it fails instead).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing Debian's chromium for the report's browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; } >/dev/null 2>&1 \
    || echo "[test] could not install chromium: the browser test will be skipped (CI fails it)" >&2
fi
# Formatting is part of the suite: the project's formatter (ruff, configured in pyproject) in check mode.
if ! python -m ruff format --check --quiet src tests benchmarks scripts; then
  echo "[test] files above are not formatted: run '.venv/bin/python -m ruff format src tests benchmarks scripts'" >&2
  exit 1
fi
exec python -m pytest "$@"
