"""InfoBatch as a mode of the adaptive loop (``--selector infobatch --reselect-every 1``): the
pruning rule against the paper's and the reference code's, its unbiasedness, the per-sample
losses the training step hands back, and end to end on digits: which passes prune, what they
train on, and a failure between passes resuming to the same prunings and weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.config import AdaptiveConfig, TrainConfig
from engine.data import load_source
from engine.errors import ConfigError
from engine.train import infobatch as ib
from jobs import train
from tests.conftest import assert_same_weights


def test_prune_drops_a_random_share_of_the_well_learned_and_rescales_the_rest():
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=1000)
    well = scores < scores.mean()
    pos, w = ib.prune(scores, 0.3, np.random.default_rng(1))
    assert np.all(np.diff(pos) > 0)
    assert set(np.flatnonzero(~well)) <= set(pos)                       # every hard sample trains
    kept_well = pos[well[pos]]
    assert len(kept_well) == int(0.7 * well.sum())                      # the reference's int(keep * n)
    np.testing.assert_allclose(w[well[pos]], 1 / 0.7)
    np.testing.assert_array_equal(w[~well[pos]], 1.0)
    again, w2 = ib.prune(scores, 0.3, np.random.default_rng(1))
    np.testing.assert_array_equal(pos, again)
    # nothing is below the mean of equal scores (the first pass: every score starts at 3)
    pos, w = ib.prune(np.full(50, ib.INITIAL_SCORE), 0.5, rng)
    assert len(pos) == 50 and np.all(w == 1)
    assert ib.keep_ratio(0.95) == 0.1 and ib.keep_ratio(0.0) == 1.0    # the reference's clip


def test_a_pruned_pass_is_unbiased_for_the_full_sum():
    """E[Σ_kept w_i g_i] = Σ_all g_i (the paper's rescaling): averaged over draws."""
    rng = np.random.default_rng(3)
    n = 400
    scores = rng.gamma(2.0, size=n)
    g = rng.normal(size=(n, 3)) + 1.0
    g[scores < scores.mean()] *= 0.2          # well learned: small gradients
    draws = [ib.prune(scores, 0.5, np.random.default_rng(s)) for s in range(3000)]
    mean = np.mean([(g[p] * w[:, None]).sum(0) for p, w in draws], axis=0)
    full = g.sum(0)
    learned = (scores < scores.mean()).sum()
    bias = (1 - int(0.5 * learned) / (0.5 * learned)) * g[scores < scores.mean()].sum(0)  # int() rounding only
    np.testing.assert_allclose(mean, full - bias, rtol=0.02)
    assert np.mean([len(p) for p, _ in draws]) < n - 0.45 * learned


def test_which_passes_prune():
    assert [e for e in range(1, 41) if not ib.prunes(e, 40, 0.875)] == [37, 38, 39, 40]
    assert [e for e in range(1, 5) if ib.prunes(e, 4, 0.5)] == [1, 2, 3]


@pytest.mark.parametrize("changes, needle", [
    ({"every": 2}, "give --reselect-every 1"),
    ({"warm_start": "full:1"}, "takes no --warm-start"),
    ({"params": {"prune_ratio": 1.0}}, "prune_ratio"),
    ({"params": {"delta": 0}}, "delta"),
    ({"params": {"lam": 1}}, "has no parameter 'lam'"),
])
def test_bad_infobatch_settings_are_refused(changes, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig(adaptive=AdaptiveConfig(**{"every": 1, "selector": "infobatch", **changes})).validate()
    assert needle in str(e.value)
    with pytest.raises(ConfigError, match="needs --budget epochs and --weighting loss"):
        TrainConfig(budget="steps", adaptive=AdaptiveConfig(every=1, selector="infobatch")).validate()


def test_the_training_step_hands_back_each_samples_loss():
    """With a learning rate of 0 the losses written are the model's cross-entropy on each row."""
    from engine.data.base import ArraySplit
    from engine.train import train_epoch
    from engine.train.loops import batch_to_input

    src = load_source("digits")
    info, full = src.info(), src.arrays("train")
    split = ArraySplit(full.sample_id[:300], full.image[:300], full.label[:300])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    losses = torch.full((300,), float("nan"), dtype=torch.float64)
    batches = [np.arange(0, 300, 2), np.arange(1, 200, 2)]          # rows 201, 203, ... unvisited
    train_epoch(model, opt, sched, split, info, batches, torch.device("cpu"), losses=losses)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(batch_to_input(split.image, info, torch.device("cpu"))),
                                                 torch.as_tensor(split.label), reduction="none").double()
    seen = np.zeros(300, bool)
    seen[np.concatenate(batches)] = True
    torch.testing.assert_close(losses[seen], want[seen], rtol=1e-6, atol=1e-7)
    assert torch.isnan(losses[~seen]).all()


def _run(run_job, out, *extra):
    return run_job(train, ["--data", "digits", "--batch-size", "128", "--epochs", "4", "--reselect-every", "1",
                           "--selector", "infobatch", "--select-params", "delta=0.5", "--out", out, *extra])


def test_infobatch_end_to_end(ray_local, run_job, tmp_path):
    """4 passes, delta 0.5: pass 1 trains on everything (equal initial scores), passes 2-3 prune
    (e - 1 <= 2), pass 4 anneals on everything; samples seen add up; the LR schedule spans
    full passes (the steps taken are fewer than planned)."""
    code, stdout, err = _run(run_job, tmp_path / "a")
    assert code == 0, err
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    n = load_source("digits").num_rows("train")
    recs = m["reselections"]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["pruned"] == 0 and recs[3]["pruned"] == 0 and recs[3]["size"] == n
    assert all(0 < r["pruned"] < n / 2 and r["rescaled"] > 0 for r in recs[1:3])
    assert m["samples_seen"] == sum(r["size"] for r in recs) < 4 * n
    assert m["samples_vs_full"] == pytest.approx(m["samples_seen"] / (4 * n))
    assert m["selection_scoring_s"] == 0 and "infobatch before pass 2:" in stdout
    assert recs[0]["scored"] == 0 and all(r["scored"] == n for r in recs[1:])  # pass 1 scored every sample
    code, _, err = _run(run_job, tmp_path / "b")
    assert code == 0, err
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())["reselections"]
    assert [(r["size"], r["pruned"]) for r in again] == [(r["size"], r["pruned"]) for r in recs]
    assert_same_weights(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")


def test_a_failure_between_infobatch_passes_resumes_to_the_same_run(ray_local, run_job, tmp_path, drills_here):
    """The loop fails after pass 1's checkpoint and restarts from it: the scores come back from
    the checkpoint, the passes prune as in the uninterrupted run and it ends on its weights."""
    code, _, err = _run(run_job, tmp_path / "clean")
    assert code == 0, err
    chaos = tmp_path / "chaos"
    (chaos / "_partial").mkdir(parents=True)
    (chaos / "_partial" / "chaos-fail-worker").touch()
    code, stdout, err = _run(run_job, chaos, "--executor", "in-process")
    assert code == 0, err
    assert "restarting from its last checkpoint" in stdout
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    m = json.loads((chaos / "metrics.json").read_text())
    assert m["restarts"] == 1
    assert [(r["epoch"], r["size"], r["pruned"]) for r in m["reselections"]] == \
        [(r["epoch"], r["size"], r["pruned"]) for r in clean["reselections"]]
    assert_same_weights(tmp_path / "clean" / "model.pt", chaos / "model.pt")


def test_two_workers_gather_every_samples_loss(ray_local, run_job, tmp_path):
    """Two Ray Train workers each train on half of every pass's rows; their losses are gathered
    by sample_id, so after pass 1 every sample has a score of its own on every worker, and
    the workers prune alike (one subset: the run completes its steps)."""
    code, _, err = _run(run_job, tmp_path / "two", "--workers", "2", "--cpus-per-worker", "1",
                        "--executor", "ray-train")
    assert code == 0, err
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    n = load_source("digits").num_rows("train")
    recs = m["reselections"]
    assert [r["scored"] for r in recs] == [0, n, n, n]
    assert all(r["pruned"] > 0 for r in recs[1:3]) and m["passes"] == 4
