"""Scorers against direct references; history scorers on hand-made histories."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.errors import ConfigError
from engine.scores import HISTORY_SCORERS, SCORERS, parse_score_names, score_batch
from engine.scores.aggregate import history_scores, mean_std_over_seeds


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).double()


def batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_el2n_matches_per_sample_definition():
    model, (x, y) = tiny_model(), batch()
    model.train()  # the scorer must switch to eval and restore
    got = SCORERS["el2n"](model, x, y)
    assert model.training
    model.eval()
    ref = [torch.linalg.vector_norm(torch.softmax(model(x[i:i + 1])[0], 0) - torch.eye(3, dtype=x.dtype)[y[i]])
           for i in range(len(x))]
    assert got.dtype == torch.float32 and got.shape == (len(x),)
    np.testing.assert_allclose(got.numpy(), torch.stack(ref).detach().numpy(), rtol=1e-6)


def test_loss_matches_cross_entropy():
    model, (x, y) = tiny_model(), batch()
    model.eval()
    ref = torch.stack([nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(SCORERS["loss"](model, x, y).numpy(), ref.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", SCORERS.names())
def test_scores_are_permutation_equivariant_and_batch_size_free(name):
    model, (x, y) = tiny_model(), batch(16)
    full = SCORERS[name](model, x, y).numpy()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(SCORERS[name](model, x[perm], y[perm]).numpy(), full[perm.numpy()], rtol=1e-6)
    halves = np.concatenate([SCORERS[name](model, x[:5], y[:5]).numpy(), SCORERS[name](model, x[5:], y[5:]).numpy()])
    np.testing.assert_allclose(halves, full, rtol=1e-6)


def test_forgetting_counts_transitions_and_ranks_never_learned_highest():
    correct = np.array([
        [1, 0, 0, 1],
        [0, 0, 1, 1],
        [1, 0, 0, 1],
        [0, 0, 1, 1],
    ], dtype=bool)
    f = HISTORY_SCORERS["forgetting"](correct)
    # sample 0: 1->0 twice; sample 1: never learned; sample 2: 1->0 once; sample 3: never forgotten
    np.testing.assert_array_equal(f, [2, 4, 1, 0])
    assert f.dtype == np.float32


def test_aggregation_mean_and_std():
    per = {"el2n@s0_e3": np.array([1.0, 2.0], np.float32), "el2n@s1_e3": np.array([3.0, 2.0], np.float32)}
    out = mean_std_over_seeds(per, {"el2n": (3,)}, [0, 1])
    np.testing.assert_allclose(out["el2n"], [2.0, 2.0])
    np.testing.assert_allclose(out["el2n_std"], [1.0, 0.0])
    hist = history_scores({0: np.array([[1], [0]], bool), 1: np.array([[1], [1]], bool)}, ["forgetting"])
    np.testing.assert_allclose(hist["forgetting"], [0.5])


def test_score_batch_keys():
    model, (x, y) = tiny_model(), batch()
    out = score_batch({"s0_e1": model, "s0_e0": model}, x, y, [("el2n", "s0_e1"), ("loss", "s0_e0")])
    assert sorted(out) == ["el2n@s0_e1", "loss@s0_e0"]


def test_parse_score_names_errors():
    assert parse_score_names("el2n, forgetting") == ["el2n", "forgetting"]
    with pytest.raises(ConfigError, match="unknown score 'nope'; known: .*el2n.*forgetting"):
        parse_score_names("el2n,nope")
    with pytest.raises(ConfigError, match="duplicate"):
        parse_score_names("el2n,el2n")


@pytest.mark.parametrize("name", SCORERS.names())
def test_each_entry_describes_its_scorer(name):
    """Every keyword parameter (the scorer's own, or geometry's for the scorers that forward
    to it) is described with a help text and a rule that admits its default; the default
    parameters pass the checks the jobs run."""
    from engine.scores import check_params

    e = SCORERS[name]
    assert e.summary and isinstance(e.bf16, bool)
    assert e.fixed_epochs is None or all(isinstance(x, int) and x >= 0 for x in e.fixed_epochs)
    for p in e.params:
        assert p.help and (p.rule is None or p.rule.admits(p.default)), p
    assert check_params({name: {p.name: p.default for p in e.params}}) == {name: {p.name: p.default for p in e.params}}


def test_readme_score_table_matches_the_registries():
    """The README's score table names exactly the registered scores (model and history)."""
    import re

    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text.split("### Scores (`--scores`)", 1)[1].split("\n### ", 1)[0]
    first_cells = [m.group(1) for m in re.finditer(r"^\| ([^|]+) \|", section, re.M)]
    named = {n for cell in first_cells for n in re.findall(r"`(\w+)`", cell)}
    assert named == set(SCORERS.names()) | set(HISTORY_SCORERS.names())
