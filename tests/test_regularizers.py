"""engine.train.regularizers: parameter gradients against central finite differences in float64
on smooth (softplus) models, the curvature penalty against the ``curvature`` scorer, GradReg
against per-sample autograd, BatchNorm running statistics untouched by the penalty's extra
forwards, and ``build_penalty``'s combination rules."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.scores import SCORERS
from engine.train.regularizers import (
    DEFAULT_CURVATURE_EPS,
    SLO_CURVES_LAMBDAS,
    Penalty,
    build_penalty,
    curvature_penalty,
    gradreg_penalty,
    input_units,
)

EPS = 0.1  # Curv's per-coordinate step in input units: large enough for a clearly non-zero Curv


def make_model(kind: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(32, 8), nn.Softplus(beta=2.0), nn.Linear(8, 3))
    else:  # conv + BatchNorm + softplus
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Softplus(beta=2.0),
                              nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    model = model.to(dtype)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(16, 2, 4, 4, dtype=dtype) * 1.5 + 0.3)
    return model


def data(n: int = 6, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def buffers(model):
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def load_buffers(model, saved):
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(saved[k])


def directional_check(model, loss_fn, seed: int = 0, delta: float = 1e-5) -> float:
    """Relative error between <∇θ loss, u> by autograd and by central differences along a
    random unit direction u; BatchNorm buffers are reset before every evaluation."""
    saved = buffers(model)
    params = [p for p in model.parameters()]
    g = torch.Generator().manual_seed(seed)
    dirs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    scale = sum(d.pow(2).sum() for d in dirs).sqrt()
    dirs = [d / scale for d in dirs]
    model.zero_grad()
    load_buffers(model, saved)
    loss_fn(model).backward()
    analytic = float(sum((p.grad * d).sum() for p, d in zip(params, dirs)))
    base = [p.detach().clone() for p in params]

    def at(t):
        with torch.no_grad():
            for p, p0, d in zip(params, base, dirs):
                p.copy_(p0 + t * d)
        load_buffers(model, saved)
        return float(loss_fn(model).detach())

    fd = (at(delta) - at(-delta)) / (2 * delta)
    at(0.0)
    model.zero_grad()
    assert abs(fd) > 1e-6, "degenerate check: the directional derivative is ~0"
    return abs(analytic - fd) / abs(fd)


def _loss(x, y, lam=0.0, mu=0.0, ce=True):
    pen = Penalty(lam, mu, EPS)

    def fn(model):
        p = pen(model, x, y)  # before the CE forward: the penalty sees the same running stats every time
        c = F.cross_entropy(model(x), y, reduction="none") if ce else torch.zeros_like(p)
        return (c + p).mean()

    return fn


@pytest.mark.parametrize("kind", ["mlp", "conv-bn"])
@pytest.mark.parametrize("lam,mu,ce", [(0.7, 0.0, True), (1.0, 0.0, False), (0.0, 1.0, False), (5.0, 0.3, True)])
def test_parameter_gradient_matches_finite_differences(kind, lam, mu, ce):
    model = make_model(kind)
    x, y = data()
    for seed in range(2):
        assert directional_check(model, _loss(x, y, lam, mu, ce), seed=seed) < 1e-6


def test_penalty_gradient_survives_a_later_train_mode_forward():
    """The penalty's graph holds BatchNorm's running statistics; a train-mode forward after it
    (the trainer's CE forward) updates the real buffers in place, which PyTorch does not
    detect. The penalty must therefore keep private copies, or its gradient silently changes."""
    a, b = make_model("conv-bn"), make_model("conv-bn")
    x, y = data()
    pen = Penalty(1.0, 0.5, EPS)
    pa = pen(a, x, y).sum()
    a(x * 3.0 + 1.0)  # train mode: moves a's running statistics
    pa.backward()
    pen(b, x, y).sum().backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_parameter_gradient_is_not_the_plain_ce_gradient():
    """The check above can fail: the CE-only gradient misses the penalty's contribution."""
    model = make_model("conv-bn")
    x, y = data()
    full = _loss(x, y, lam=5.0)
    ce_only = _loss(x, y)
    model.zero_grad()
    full(model).backward()
    g_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ce_only(model).backward()
    diff = sum((a - p.grad).pow(2).sum() for a, p in zip(g_full, model.parameters())).sqrt()
    assert diff > 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-4)])
@pytest.mark.parametrize("kind", ["mlp", "conv-bn"])
def test_curvature_penalty_equals_curvature_scorer(kind, dtype, tol):
    model = make_model(kind, dtype=dtype)
    x, y = data(dtype=dtype)
    model.train()  # the penalty switches to eval mode itself; the scorer does too
    pen = curvature_penalty(model, x, y, eps=EPS)
    assert model.training and all(m.training for m in model.modules())
    ref = SCORERS["curvature"](model, x, y, eps=EPS)
    assert pen.shape == (len(x),) and pen.dtype == dtype
    assert (ref > 1e-3).all()
    assert torch.allclose(pen.detach().float(), ref, rtol=tol, atol=0)
    # the default eps is the scorer's
    assert torch.allclose(curvature_penalty(model, x, y).detach().float(), SCORERS["curvature"](model, x, y),
                          rtol=tol, atol=1e-7)


def test_gradreg_is_squared_norm_of_per_sample_loss_gradient():
    model = make_model("conv-bn")
    x, y = data()
    got = gradreg_penalty(model, x, y)
    model.eval()
    ref = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        ref.append(g.pow(2).sum())
    model.train()
    assert torch.allclose(got.detach(), torch.stack(ref), rtol=1e-10, atol=0)


def test_penalty_is_per_sample_in_train_mode():
    """Eval-mode penalties: a sample's value does not depend on the rest of its batch."""
    model = make_model("conv-bn")
    x, y = data(n=5)
    pen = Penalty(2.0, 0.5, EPS)
    batch = pen(model, x, y).detach()
    alone = torch.cat([pen(model, x[i:i + 1], y[i:i + 1]).detach() for i in range(len(x))])
    assert torch.allclose(batch, alone, rtol=1e-10, atol=0)


def test_batchnorm_running_stats_equal_those_of_the_plain_ce_forward():
    base = make_model("conv-bn")
    base.train()
    x, y = data(n=8)
    plain, reg = copy.deepcopy(base), copy.deepcopy(base)
    F.cross_entropy(plain(x), y).backward()
    pen = build_penalty(curvature_lambda=10.0, gradreg_mu=1.0, curvature_eps=EPS)
    ce = F.cross_entropy(reg(x), y, reduction="none")
    (ce + pen(reg, x, y)).mean().backward()
    b_plain, b_reg, b_base = buffers(plain), buffers(reg), buffers(base)
    assert b_plain.keys() == b_reg.keys() and "1.num_batches_tracked" in b_reg
    for k in b_plain:
        assert torch.equal(b_plain[k], b_reg[k]), k
    # and the CE forward did move them (the comparison is not vacuous)
    assert not torch.equal(b_plain["1.running_mean"], b_base["1.running_mean"])
    assert all(m.training for m in reg.modules())
    grads_differ = any(not torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), reg.parameters()))
    assert grads_differ


def test_frozen_submodule_stays_in_eval_mode():
    model = make_model("conv-bn")
    model.train()
    model[1].eval()  # a caller-frozen BatchNorm
    x, y = data()
    Penalty(1.0, 1.0, EPS)(model, x, y)
    assert model.training and not model[1].training and model[0].training


def test_zero_weights_give_exactly_the_plain_ce_gradient():
    assert build_penalty() is None
    assert build_penalty(0.0, 0.0, 0.5) is None
    model = make_model("conv-bn")
    x, y = data()
    saved = buffers(model)
    zero = Penalty(0.0, 0.0, EPS)(model, x, y)
    assert torch.equal(zero, torch.zeros(len(x), dtype=x.dtype))
    (F.cross_entropy(model(x), y, reduction="none") + zero).mean().backward()
    g_pen = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    load_buffers(model, saved)
    F.cross_entropy(model(x), y, reduction="none").mean().backward()
    for a, p in zip(g_pen, model.parameters()):
        assert torch.equal(a, p.grad)


def test_build_penalty_combines_terms():
    model = make_model("mlp")
    x, y = data()
    curv = curvature_penalty(model, x, y, eps=EPS).detach()
    grad = gradreg_penalty(model, x, y).detach()
    only_c, only_g, both = build_penalty(1.5, 0.0, EPS), build_penalty(0.0, 0.3, EPS), build_penalty(1.5, 0.3, EPS)
    assert isinstance(both, Penalty) and both.curvature_eps == EPS
    assert torch.allclose(only_c(model, x, y).detach(), 1.5 * curv, rtol=1e-12, atol=0)
    assert torch.allclose(only_g(model, x, y).detach(), 0.3 * grad, rtol=1e-12, atol=0)
    assert torch.allclose(both(model, x, y).detach(), 1.5 * curv + 0.3 * grad, rtol=1e-12, atol=0)
    assert build_penalty(1.0).curvature_eps == DEFAULT_CURVATURE_EPS == 8 / 255


@pytest.mark.parametrize("kwargs,field", [({"curvature_lambda": -1.0}, "curvature_lambda"),
                                          ({"gradreg_mu": float("nan")}, "gradreg_mu"),
                                          ({"curvature_lambda": 1.0, "curvature_eps": 0.0}, "curvature_eps")])
def test_build_penalty_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_penalty(**kwargs)


def test_constants_and_units():
    assert SLO_CURVES_LAMBDAS == (0.0, 0.5, 1.0, 5.0, 10.0, 20.0, 50.0)
    assert input_units(8 / 255, (0.5, 0.5, 0.5)) == pytest.approx(16 / 255)
    assert input_units(0.1, 0.25) == pytest.approx(0.4)


def test_curvature_penalty_zero_step_has_zero_value_and_finite_gradient():
    model = make_model("mlp")
    x, y = data()
    c = curvature_penalty(model, x, y, eps=0.0)
    assert torch.equal(c.detach(), torch.zeros(len(x), dtype=x.dtype))
    c.sum().backward()
    assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for p in model.parameters())
