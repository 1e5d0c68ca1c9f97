"""No silent waits (issue 29, slice 3, local part): on a local Ray, asking for GPUs or CPUs the
machine does not have is one line and exit 2 within seconds, before any work starts. (The test
session's Ray has 2 CPUs and no GPU; before this, these commands waited forever.)"""
from __future__ import annotations

import time

import pytest

from jobs import score, train


@pytest.mark.timeout(90)  # before the fix these waited forever: fail instead of hanging
@pytest.mark.parametrize("job, argv, needle", [
    (train, ["--gpus", "1"], "needs 1 GPU(s) in all; this machine's Ray has 0"),
    (train, ["--workers", "2", "--cpus-per-worker", "2"], "needs 4 CPU(s) in all; this machine's Ray has 2"),
    (score, ["--gpus-per-actor", "1"], "--gpus-per-actor 1 with --cpus-per-actor 1 needs 1 GPU(s) in all"),
    (score, ["--cpus-per-actor", "3"], "needs 3 CPU(s) in all; this machine's Ray has 2"),
])
def test_impossible_local_requests_fail_fast(ray_local, run_job, tmp_path, job, argv, needle):
    out = tmp_path / "run"
    t0 = time.time()
    code, _, err = run_job(job, ["--data", "digits", "--epochs", "1", "--out", out, *argv])
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert time.time() - t0 < 30 and not out.exists()
