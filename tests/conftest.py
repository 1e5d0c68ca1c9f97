"""Shared fixtures: one local Ray instance per test session, started only by tests that need it.

Every test that uses Ray (the ``ray_local`` or ``ray_head`` fixtures) is marked ``ray``:
``make test-fast`` runs the rest, the pure core, in well under a minute."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RAY_FIXTURES = {"ray_local", "ray_head"}

# Ray Train's controller polls its workers every 2 s and starts a preemption watcher actor (a
# process of its own) for spot instances: on 2 cores that is ~4 s of every short test fit, and
# nothing a test checks. Set for the test session (and the job subprocesses it starts) only.
for _name, _value in {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                      "RAY_TRAIN_METRICS_ENABLED": "0"}.items():
    os.environ.setdefault(_name, _value)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray (own temp dir, no dashboard) shared by every test that asks for it;
    shut down by ``ray.shutdown()`` at the end of the session, never by ``ray stop``."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    tmp = os.environ.get("WINNOW_RAY_TMPDIR") or tempfile.mkdtemp(prefix="wnr-", dir="/tmp")
    # the fault drills (tests/drills.py) in every worker and actor of this Ray: they inherit the
    # environment it starts with (the test process itself does not need them)
    previous = os.environ.get("WINNOW_HOOKS")
    os.environ["WINNOW_HOOKS"] = "tests.drills"
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING",
                 log_to_driver=False)
    finally:
        if previous is None:
            os.environ.pop("WINNOW_HOOKS")
        else:
            os.environ["WINNOW_HOOKS"] = previous
    yield ray
    ray.shutdown()


@pytest.fixture
def run_job(capsys):
    """Run a job's ``main`` in-process like the CLI does; returns (exit status, stdout, stderr)."""
    from jobs._cli import run

    def _run(module, argv):
        code = run(module.__name__, module.main, [str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


@pytest.fixture
def drills_here():
    """The fault drills (tests/drills.py) in this process too: an in-process run's loop runs here."""
    from engine import hooks

    hooks.install("tests.drills")
    yield
    hooks.uninstall_all()


def assert_same_weights(a: Path, b: Path) -> None:
    """Two saved state dicts hold the same tensors, bit for bit."""
    import torch

    sa, sb = torch.load(a, map_location="cpu"), torch.load(b, map_location="cpu")
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
