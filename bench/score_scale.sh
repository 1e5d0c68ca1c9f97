#!/usr/bin/env bash
# Driver memory at scale (issue 5): jobs.score over 1,000,000 synthetic 32x32x3 images with a
# small model and one cheap score (EL2N at initialisation: --epochs 0 trains nothing), 2 actors
# of half a logical CPU each (so the read tasks keep a slot on a 2-core machine).
# Prints the job's output and the driver's peak RSS (the jobs.score process; Ray's own
# processes and the actors are separate processes and not counted).
#   bash bench/score_scale.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-1000000}"
OUT="$(mktemp -d /tmp/winnow-scale-XXXXXX)"
.venv/bin/python - "$ROWS" "$OUT" <<'PY'
import resource, sys, time
rows, out = sys.argv[1], sys.argv[2]
from jobs._cli import run
import jobs.score as job
t0 = time.time()
code = run("jobs.score", job.main, ["--data", f"synthetic:{rows},32x32,3", "--model", "small-cnn", "--scores", "el2n",
                                     "--seeds", "1", "--epochs", "0", "--actors", "2", "--min-actors", "2", "--cpus-per-actor", "0.5",
                                     "--score-batch-size", "1024",
                                     "--out", f"{out}/run"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"exit {code}; {rows} rows in {time.time() - t0:.0f} s; driver peak RSS {peak:.2f} GiB")
PY
rm -rf "$OUT"
