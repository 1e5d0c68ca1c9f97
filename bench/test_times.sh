#!/usr/bin/env bash
# Wall time of the test suite's selections, each with its 10 slowest tests (issue 28):
#   bench/test_times.sh            # make test-fast's and make test's pytest runs (not the lint / setup)
#   bench/test_times.sh all        # also make test-all's
# Runs one selection after the other (one Ray at a time); about 8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
selections=("not slow and not gpu and not ray" "not slow and not gpu")
if [ "${1:-}" = all ]; then selections+=("not gpu"); fi
echo "$(date -u +%F) $(nproc) cores, $($PY -c 'import platform; print(platform.processor() or platform.machine())')"
for sel in "${selections[@]}"; do
  echo "== pytest -m '$sel'"
  start=$(date +%s.%N)
  $PY -m pytest -q -p no:cacheprovider -m "$sel" --durations=10 2>&1 | grep -E "^[0-9.]+s |passed|failed|error" || true
  echo "wall $($PY -c "print(round($(date +%s.%N) - $start, 1))") s"
done
