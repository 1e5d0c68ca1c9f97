"""engine.evaluation: ℓ2 PGD (ball, box, never lowers the loss, the analytic optimum on a linear
model), robust accuracy (clean accuracy at eps 0, non-increasing, equal to a direct PGD
evaluation) and the geometry table against a brute-force full input Hessian in float64."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.data import ArraySplit, DataInfo
from engine.evaluation import LCNN_PGD_EPS, geometry_metrics, normalizer, pgd_l2, robust_accuracy

INFO = DataInfo(spec="test", num_classes=3, image_shape=(4, 4, 2), mean=(0.5, 0.45), std=(0.25, 0.3))


def conv_model(seed: int = 0, dtype=torch.float64, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=2.0),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, classes)).to(dtype)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(16, 2, 4, 4, dtype=dtype) * 1.3 + 0.2)
    return model.eval()


def split(n: int = 24, seed: int = 0, labels=None) -> ArraySplit:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(n, 4, 4, 2), dtype=np.uint8)
    label = rng.integers(0, 3, size=n).astype(np.int64) if labels is None else labels
    return ArraySplit(np.arange(100, 100 + n, dtype=np.int64), image, label)


def unit(images: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(images).permute(0, 3, 1, 2).to(dtype) / 255.0


def per_sample_ce(model, x01, y, norm):
    with torch.no_grad():
        return F.cross_entropy(model(norm(x01)), y, reduction="none")


@pytest.mark.parametrize("eps", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stays_in_ball_and_box_and_never_lowers_the_loss(eps, random_start):
    model = conv_model()
    rows = split(n=16)
    x01 = unit(rows.image)
    x01[0] = 0.0  # corners of the box: clipping must bind
    x01[1] = 1.0
    y = torch.as_tensor(rows.label)
    norm = normalizer(INFO, torch.device("cpu"), torch.float64)
    adv = pgd_l2(model, x01, y, eps=eps, steps=10, step_size=eps, normalize_fn=norm, random_start=random_start,
                 generator=torch.Generator().manual_seed(3))
    assert adv.shape == x01.shape and not adv.requires_grad
    dist = torch.linalg.vector_norm((adv - x01).flatten(1), dim=1)
    assert (dist <= eps + 1e-6).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    before, after = per_sample_ce(model, x01, y, norm), per_sample_ce(model, adv, y, norm)
    assert (after >= before).all()
    assert (after > before + 1e-6).float().mean() > 0.5  # the attack does something


def test_pgd_restores_mode_and_leaves_batchnorm_and_params_alone():
    model = conv_model()
    model.train()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rows = split(n=8)
    norm = normalizer(INFO, torch.device("cpu"), torch.float64)
    pgd_l2(model, unit(rows.image), torch.as_tensor(rows.label), eps=0.3, steps=5, step_size=0.1, normalize_fn=norm)
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_pgd_reaches_the_analytic_optimum_on_a_linear_two_class_model():
    """For logits linear in x the margin z_y − z_o has a constant gradient w; the max loss on
    the ℓ2 ball (box not binding) is softplus(−(m − eps·||w||))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 2)).double().eval()
    g = torch.Generator().manual_seed(1)
    x01 = 0.3 + 0.4 * torch.rand(10, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=g)
    norm = normalizer(INFO, torch.device("cpu"), torch.float64)
    eps = 0.05
    adv = pgd_l2(model, x01, y, eps=eps, steps=20, step_size=None, normalize_fn=norm)
    x = x01.clone().requires_grad_(True)
    z = model(norm(x))
    margin = z.gather(1, y.view(-1, 1)).squeeze(1) - z.gather(1, (1 - y).view(-1, 1)).squeeze(1)
    (w,) = torch.autograd.grad(margin.sum(), x)
    optimum = F.softplus(-(margin.detach() - eps * torch.linalg.vector_norm(w.flatten(1), dim=1)))
    got = per_sample_ce(model, adv, y, norm)
    assert torch.allclose(got, optimum, rtol=1e-9, atol=0)
    assert (got > per_sample_ce(model, x01, y, norm) + 1e-4).all()


def direct_clean_accuracy(model, rows):
    norm = normalizer(INFO, torch.device("cpu"), torch.float64)
    with torch.no_grad():
        pred = model(norm(unit(rows.image))).argmax(1)
    return float((pred == torch.as_tensor(rows.label)).double().mean())


def mixed_split(model, n=40):
    """Labels = the model's own prediction for even rows, shifted by one for odd rows: the
    clean accuracy is 1/2 and the attack has something to break."""
    rows = split(n=n)
    norm = normalizer(INFO, torch.device("cpu"), torch.float64)
    with torch.no_grad():
        pred = model(norm(unit(rows.image))).argmax(1).numpy()
    labels = np.where(np.arange(n) % 2 == 0, pred, (pred + 1) % 3).astype(np.int64)
    return ArraySplit(rows.sample_id, rows.image, labels)


def test_robust_accuracy_starts_at_clean_accuracy_and_is_non_increasing():
    model = conv_model()
    rows = mixed_split(model)
    clean = direct_clean_accuracy(model, rows)
    assert clean == 0.5
    eps = (0.0, 0.05, 0.2, 1.0, 3.0)
    res = robust_accuracy(model, rows, INFO, torch.device("cpu"), eps_list=eps, steps=10, batch_size=16)
    assert list(res) == sorted(eps)
    assert res[0.0] == clean
    vals = [res[e] for e in sorted(eps)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert res[3.0] < clean  # a large radius breaks some samples
    plain = robust_accuracy(model, rows, INFO, torch.device("cpu"), eps_list=(0.0, 1e-9), steps=5,
                            cumulative=False)
    assert plain[0.0] == clean and plain[1e-9] == clean
    assert set(robust_accuracy(model, rows, INFO, torch.device("cpu"), steps=2)) == {0.0, *LCNN_PGD_EPS}


def test_robust_accuracy_equals_a_direct_pgd_evaluation():
    model = conv_model()
    full = mixed_split(model, n=40)
    res = robust_accuracy(model, full, INFO, torch.device("cpu"), eps_list=(0.5, 1.5), steps=8, step_size=0.2,
                          max_samples=30, batch_size=7, cumulative=False)
    rows = ArraySplit(full.sample_id[:30], full.image[:30], full.label[:30])
    norm = normalizer(INFO, torch.device("cpu"), torch.float64)
    x01, y = unit(rows.image), torch.as_tensor(rows.label)
    for eps in (0.5, 1.5):
        adv = pgd_l2(model, x01, y, eps=eps, steps=8, step_size=0.2, normalize_fn=norm)
        with torch.no_grad():
            want = float((model(norm(adv)).argmax(1) == y).double().mean())
        assert res[eps] == pytest.approx(want, abs=1e-12)
    assert res[0.0] == direct_clean_accuracy(model, rows)


def brute_geometry(model, rows):
    """Per sample: f = the labelled class's logit of the normalised input; ||∇f||₂ by autograd,
    ||∇²f||₂ = the spectral norm of the full input Hessian."""
    x_all = normalizer(INFO, torch.device("cpu"), torch.float64)(unit(rows.image))
    grads, hess = [], []
    for i in range(len(rows)):
        yi = int(rows.label[i])

        def f(v):
            return model(v.unsqueeze(0))[0, yi]

        xi = x_all[i].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xi), xi)
        h = torch.autograd.functional.hessian(f, x_all[i], vectorize=True).reshape(xi.numel(), xi.numel())
        grads.append(float(g.norm()))
        hess.append(float(torch.linalg.matrix_norm(h, ord=2)))
    grads, hess = np.array(grads), np.array(hess)
    return {"grad_norm": grads.mean(), "hessian_norm": hess.mean(), "normalized_curvature": (hess / (grads + 1e-6)).mean()}


def test_geometry_metrics_match_brute_force_hessian():
    model = conv_model()
    rows = split(n=12, seed=5)
    got = geometry_metrics(model, rows, INFO, torch.device("cpu"), max_samples=9, batch_size=5, iters=250,
                           hvp="exact")
    head = ArraySplit(rows.sample_id[:9], rows.image[:9], rows.label[:9])
    want = brute_geometry(model, head)
    assert got["samples"] == 9
    for k, v in want.items():
        assert v > 1e-3 and abs(got[k] - v) / v < 1e-3, (k, got[k], v)
    assert got["accuracy"] == direct_clean_accuracy(model, head)
    assert got["grad_norm_std"] > 0


def test_geometry_metrics_fd_is_close_and_defaults_run():
    model = conv_model()
    rows = split(n=6, seed=2)
    exact = geometry_metrics(model, rows, INFO, torch.device("cpu"), iters=50, hvp="exact")
    fd = geometry_metrics(model, rows, INFO, torch.device("cpu"), iters=50, hvp="fd", fd_step=1e-6)
    assert math.isclose(fd["hessian_norm"], exact["hessian_norm"], rel_tol=1e-3)
    assert fd["grad_norm"] == pytest.approx(exact["grad_norm"], rel=1e-6)


def test_empty_selection_and_negative_radius_are_errors():
    model = conv_model()
    empty = ArraySplit(np.zeros(0, np.int64), np.zeros((0, 4, 4, 2), np.uint8), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="at least one sample"):
        robust_accuracy(model, empty, INFO, torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one sample"):
        geometry_metrics(model, empty, INFO, torch.device("cpu"))
    with pytest.raises(ValueError, match=">= 0"):
        robust_accuracy(model, split(n=4), INFO, torch.device("cpu"), eps_list=(-0.1,))


def test_cumulative_rule_keeps_the_breaks_of_smaller_radii(monkeypatch):
    """A weak attack at a larger radius must not resurrect samples broken at a smaller one: a
    point of the 0.1-ball is also in the 0.2-ball."""
    import engine.evaluation as ev

    real = ev.pgd_l2

    def fake(model, x01, y, *, eps, **kw):
        if eps == 0.1:  # strong: breaks samples
            return real(model, x01, y, eps=3.0, steps=5, step_size=1.0, normalize_fn=kw["normalize_fn"])
        return x01.clone()  # eps 0.2: no attack at all

    monkeypatch.setattr(ev, "pgd_l2", fake)
    model = conv_model()
    rows = mixed_split(model)
    clean = direct_clean_accuracy(model, rows)
    cum = ev.robust_accuracy(model, rows, INFO, torch.device("cpu"), eps_list=(0.1, 0.2))
    plain = ev.robust_accuracy(model, rows, INFO, torch.device("cpu"), eps_list=(0.1, 0.2), cumulative=False)
    assert cum[0.1] == plain[0.1] < clean
    assert plain[0.2] == clean and cum[0.2] == cum[0.1]
