"""No silent waits (issue 29, slice 3). On a local Ray, asking for GPUs or CPUs the machine does
not have is one line and exit 2 within seconds, before any work starts (the test session's Ray
has 2 CPUs and no GPU; before this, these commands waited forever). On a cluster (RAY_ADDRESS),
the job asks the autoscaler, says what it waits for and gives up after WINNOW_RESOURCE_WAIT_S
(on a fake cluster and clock here; against a real head in tests/test_job_submit.py)."""
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


# ---- on a cluster (RAY_ADDRESS set): announced, bounded waits for the autoscaler ----

class FakeCluster:
    """Nodes that appear at given times on a fake clock; records what the job says and asks."""

    def __init__(self, nodes, arrivals=()):
        self.now, self.nodes, self.arrivals = 0.0, list(nodes), sorted(arrivals, key=lambda a: a[0])
        self.said, self.requests = [], []

    def clock(self):
        return self.now

    def sleep(self, s):
        assert s > 0
        self.now += s

    def current(self):
        while self.arrivals and self.arrivals[0][0] <= self.now:
            self.nodes.append(self.arrivals.pop(0)[1])
        return list(self.nodes)

    def kwargs(self):
        return dict(nodes=self.current, request=self.requests.append, clock=self.clock, sleep=self.sleep,
                    say=self.said.append, poll_s=5, say_every_s=60)


CPU_HEAD = {"CPU": 8.0, "memory": 1e10}
GPU_NODE = {"CPU": 16.0, "GPU": 1.0}


def test_units_that_fit_never_split_a_bundle():
    from engine.distributed.runtime import units_that_fit

    assert units_that_fit([GPU_NODE, GPU_NODE], {"GPU": 1, "CPU": 4}) == 2
    assert units_that_fit([GPU_NODE, GPU_NODE], {"GPU": 2}) == 0  # 2 GPUs in all, never 2 on one node
    assert units_that_fit([{"CPU": 16.0, "GPU": 4.0}], {"GPU": 1, "CPU": 6}) == 2  # CPUs bind first
    assert units_that_fit([CPU_HEAD], {"GPU": 0, "CPU": 0}) >= 1


def test_cluster_wait_gives_up_after_the_configured_time(monkeypatch):
    from engine.distributed.runtime import require_resources
    from engine.errors import ResourcesUnavailableError

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    monkeypatch.setenv("WINNOW_RESOURCE_WAIT_S", "200")
    fake = FakeCluster([CPU_HEAD])
    with pytest.raises(ResourcesUnavailableError, match=r"--gpus 1: the cluster did not provide 2 x 2 CPU, 1 GPU "
                                                          r"within 200 s.*WINNOW_RESOURCE_WAIT_S"):
        require_resources("--gpus 1", {"GPU": 1, "CPU": 2}, 2, **fake.kwargs())
    assert 200 <= fake.now <= 205
    assert fake.said[0].startswith("waiting for 2 x 2 CPU, 1 GPU (--gpus 1): the cluster has 8 CPU")
    assert "giving up after 200 s (WINNOW_RESOURCE_WAIT_S)" in fake.said[0]
    assert sum("still waiting" in line for line in fake.said) == 3  # at 60, 120, 180 s
    assert fake.requests == [[{"GPU": 1.0, "CPU": 2.0}] * 2, []]  # asked the autoscaler, then withdrew


def test_cluster_wait_ends_when_the_autoscaler_adds_the_nodes(monkeypatch):
    from engine.distributed.runtime import require_resources

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    monkeypatch.delenv("WINNOW_RESOURCE_WAIT_S", raising=False)
    fake = FakeCluster([CPU_HEAD], arrivals=[(130, GPU_NODE), (250, GPU_NODE)])
    require_resources("--workers 2 with --gpus 1", {"GPU": 1, "CPU": 4}, 2, **fake.kwargs())
    assert 250 <= fake.now <= 255 and fake.said[-1].startswith("the cluster has them after 25")
    assert "giving up after 900 s" in fake.said[0]  # the documented default
    assert fake.requests[-1] == []


def test_no_wait_and_no_request_when_the_cluster_has_them(monkeypatch):
    from engine.distributed.runtime import require_resources

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    fake = FakeCluster([CPU_HEAD, GPU_NODE])
    require_resources("--gpus 1", {"GPU": 1, "CPU": 2}, 1, **fake.kwargs())
    assert fake.now == 0 and fake.said == [] and fake.requests == []


@pytest.mark.parametrize("value", ["abc", "-5", "nan", "inf"])
def test_bad_wait_setting_is_one_line(monkeypatch, value):
    from engine.distributed.runtime import require_resources
    from engine.errors import ConfigError

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    monkeypatch.setenv("WINNOW_RESOURCE_WAIT_S", value)
    fake = FakeCluster([CPU_HEAD])
    with pytest.raises(ConfigError, match="WINNOW_RESOURCE_WAIT_S=.*expected a number of seconds"):
        require_resources("--gpus 1", {"GPU": 1}, 1, **fake.kwargs())
    assert fake.requests == []
