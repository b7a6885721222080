#!/usr/bin/env bash
# Bootstrap if needed, then run the main job: `finetrack demo` on the embedded model.
set -euo pipefail
BOOTSTRAP_EXTRAS=""  # the package alone: the demo needs no test or benchmark extras
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec finetrack demo "$@"
