#!/usr/bin/env bash
# Time the main job end to end (wall clock and peak memory of the driver) on this machine.
#   bash bench/pipeline.sh [extra jobs.pipeline flags]
# Prints the results table, then the elapsed time and the driver's maximum RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-runs/bench-pipeline}
echo "device: $(nproc) cores, $(python3 -c 'import os; print(round(os.sysconf("SC_PAGE_SIZE")*os.sysconf("SC_PHYS_PAGES")/2**30))') GiB, $(date -u +%F)"
/usr/bin/time -f "elapsed %e s, driver max RSS %M KiB" .venv/bin/python -m jobs.pipeline --out "$out" "$@" 2>&1 \
  | grep -vE "PlacementGroupCleaner|^\s*$" | grep -E "^\||^elapsed|^pipeline|^stage|^scored"
