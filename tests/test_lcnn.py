"""Low-curvature network layers (engine.models.lcnn) and their wiring into the model registry."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError
from engine.models import build_model
from engine.models.lcnn import (
    LCNN_DEFAULTS,
    CenteredSoftplus,
    LipschitzBatchNorm2d,
    SpectralConv2d,
    SpectralLinear,
)

TOL = 1e-3  # the spectral layers' documented tolerance (their margin)


def dense_matrix(fn, in_shape):
    """The matrix of the linear map ``fn`` on inputs of ``in_shape`` (float64, column per basis vector)."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    with torch.no_grad():
        return fn(eye).reshape(n, -1).t()


# ---------------------------------------------------------------- centered softplus


def test_centered_softplus_is_zero_at_zero_and_tends_to_relu():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    gaps = []
    for beta in (0.5, 1.0, 5.0, 50.0, 500.0):
        s = CenteredSoftplus(beta)
        assert s(torch.zeros(3, dtype=torch.float64)).abs().max() == 0
        gap = (s(x) - F.relu(x)).abs().max().item()
        assert gap <= math.log(2) / beta + 1e-12  # the documented bound, attained at 0
        gaps.append(gap)
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 2e-3


def test_centered_softplus_is_one_lipschitz_with_curvature_at_most_beta_over_4():
    beta = 5.0
    x = torch.linspace(-4, 4, 4001, dtype=torch.float64, requires_grad=True)
    y = CenteredSoftplus(beta)(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert g.min() > 0 and g.max() < 1
    assert h.max() <= beta / 4 + 1e-12 and h.max() > 0.99 * beta / 4


def test_trainable_beta_matches_fixed_and_gets_a_gradient():
    x = torch.randn(64, dtype=torch.float64)
    fixed, learnt = CenteredSoftplus(3.0), CenteredSoftplus(3.0, trainable=True).double()
    torch.testing.assert_close(learnt(x), fixed(x))
    learnt(x).sum().backward()
    assert learnt.log_beta.grad is not None and learnt.log_beta.grad != 0


def test_centered_softplus_does_not_overflow():
    y = CenteredSoftplus(50.0)(torch.tensor([-1e4, 1e4]))
    assert torch.isfinite(y).all()
    assert y[1].item() == pytest.approx(1e4 - math.log(2) / 50) and y[0].item() == pytest.approx(-math.log(2) / 50)


# ---------------------------------------------------------------- spectral normalisation


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_spectral_linear_lipschitz_is_one(scale):
    torch.manual_seed(0)
    layer = SpectralLinear(40, 24)
    with torch.no_grad():
        layer.weight.mul_(scale)
    layer(torch.randn(2, 40))
    W = layer.normalized_weight().detach().double()
    top = torch.linalg.matrix_norm(W, ord=2).item()
    assert 1 - 5 * TOL <= top <= 1 + TOL
    # measured on inputs: ‖f(a) - f(b)‖ ≤ ‖a - b‖
    a, b = torch.randn(500, 40), torch.randn(500, 40)
    with torch.no_grad():
        ratio = (layer(a) - layer(b)).norm(dim=1) / (a - b).norm(dim=1)
    assert ratio.max() <= 1 + TOL


@pytest.mark.parametrize("cin,cout,k,stride,pad,hw", [
    (1, 4, 3, 1, 1, 8), (3, 5, 3, 2, 1, 9), (4, 6, 1, 2, 0, 6), (2, 3, 5, 1, 2, 7)])
def test_spectral_conv_operator_norm_is_one(cin, cout, k, stride, pad, hw):
    """The exact operator 2-norm of the normalised convolution on [cin, hw, hw] (dense matrix SVD)."""
    torch.manual_seed(1)
    layer = SpectralConv2d(cin, cout, k, stride, pad, bias=True)
    with torch.no_grad():
        layer.weight.mul_(30.0)  # far from 1-Lipschitz before normalisation
    layer(torch.randn(2, cin, hw, hw))
    Wn = layer.normalized_weight().detach().double()
    A = dense_matrix(lambda v: F.conv2d(v, Wn, None, stride, pad), (cin, hw, hw))
    raw = dense_matrix(lambda v: F.conv2d(v, layer.weight.detach().double(), None, stride, pad), (cin, hw, hw))
    assert torch.linalg.matrix_norm(raw, ord=2) > 5  # the test is not vacuous
    top = torch.linalg.matrix_norm(A, ord=2).item()
    assert 1 - 5 * TOL <= top <= 1 + TOL


def test_spectral_conv_stays_lipschitz_while_training():
    """σ follows W by one power step per training forward: after SGD steps that change W, the
    layer is still ≤ 1 + tol Lipschitz on its input shape."""
    torch.manual_seed(2)
    layer = SpectralConv2d(3, 8, 3, 1, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    x = torch.randn(16, 3, 8, 8)
    target = torch.randn(16, 8, 8, 8)
    for _ in range(30):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
        layer(x)  # the power step that follows the update
    Wn = layer.normalized_weight().detach().double()
    A = dense_matrix(lambda v: F.conv2d(v, Wn, None, 1, 1), (3, 8, 8))
    assert torch.linalg.matrix_norm(A, ord=2).item() <= 1 + 5 * TOL


def test_spectral_conv_eval_forward_does_not_update_vectors_and_state_dict_round_trips():
    torch.manual_seed(3)
    layer = SpectralConv2d(2, 4, 3, 1, 1)
    layer(torch.randn(2, 2, 6, 6))
    u = layer.u.clone()
    layer.eval()
    y = layer(torch.randn(3, 2, 6, 6))
    assert torch.equal(layer.u, u)
    fresh = SpectralConv2d(2, 4, 3, 1, 1).eval()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 2, 6, 6)
    assert torch.equal(fresh(x), layer(x)) and y.shape == (3, 4, 6, 6)


# ---------------------------------------------------------------- γ-Lipschitz BatchNorm


def test_lipschitz_batchnorm_gain_is_at_most_gamma():
    torch.manual_seed(4)
    gamma = 2.0
    bn = LipschitzBatchNorm2d(6, gamma)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 3.0, -8.0, 2.0, 0.1]))
    for _ in range(20):  # running stats of small-variance data: raw gains far above γ
        bn(0.1 * torch.randn(32, 6, 4, 4))
    bn.eval()
    raw = bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
    assert raw.max() > 10 * gamma
    assert bn.gains().abs().max().item() == pytest.approx(gamma, rel=1e-6)
    a, b = torch.randn(200, 6, 4, 4), torch.randn(200, 6, 4, 4)
    with torch.no_grad():
        ratio = (bn(a) - bn(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratio.max() <= gamma * (1 + 1e-5)
    # channels keep their relative gains (one factor, not a per-channel clamp)
    torch.testing.assert_close(bn.gains() / bn.gains()[3], bn.weight / torch.sqrt(bn.running_var + bn.eps)
                               / (bn.weight[3] / torch.sqrt(bn.running_var[3] + bn.eps)))


def test_lipschitz_batchnorm_with_large_gamma_is_plain_batchnorm():
    torch.manual_seed(5)
    ours, ref = LipschitzBatchNorm2d(5, 1e6), nn.BatchNorm2d(5)
    for _ in range(3):
        x = torch.randn(8, 5, 3, 3)
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))


# ---------------------------------------------------------------- the model options


def reference_small_cnn(cin, classes, w=32):
    """small-cnn as it was before the LCNN options existed."""
    return nn.Sequential(
        nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * w * 16, classes))


def test_default_models_are_unchanged():
    torch.manual_seed(7)
    ref = reference_small_cnn(1, 10)
    torch.manual_seed(7)
    ours = build_model("small-cnn", 1, 10, 28)
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in ref.state_dict().items())
    res = build_model("resnet18-cifar", 3, 10, 32)
    kinds = {type(m) for m in res.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear} <= kinds
    assert not kinds & {SpectralConv2d, SpectralLinear, LipschitzBatchNorm2d, CenteredSoftplus}


@pytest.mark.parametrize("name,cin,size", [("small-cnn", 1, 28), ("resnet18-cifar", 3, 16)])
def test_lcnn_option_builds_the_papers_layers(name, cin, size):
    torch.manual_seed(0)
    m = build_model(name, cin, 10, size, lcnn=True)
    kinds = [type(x) for x in m.modules()]
    assert nn.Conv2d not in kinds and nn.BatchNorm2d not in kinds and nn.ReLU not in kinds and nn.Linear not in kinds
    assert SpectralConv2d in kinds and SpectralLinear in kinds and LipschitzBatchNorm2d in kinds
    acts = [x for x in m.modules() if isinstance(x, CenteredSoftplus)]
    assert acts and all(a.beta == LCNN_DEFAULTS["beta"] for a in acts)
    assert all(b.gamma == LCNN_DEFAULTS["bn_gamma"] for b in m.modules() if isinstance(b, LipschitzBatchNorm2d))
    # convs were sized for this input shape at build time: a fresh model loads a trained one's state
    m(torch.randn(4, cin, size, size))
    m.eval()
    fresh = build_model(name, cin, 10, size, lcnn=True).eval()
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(3, cin, size, size)
    torch.testing.assert_close(fresh(x), m(x))


def test_lcnn_network_lipschitz_bound_holds():
    """Eval-mode LCNN small-cnn: 1-Lipschitz convs, linear, activations and pooling (max-pool
    and average-pool are ≤ 1) and two γ-BNs, so ‖∇ₓ f_c‖ ≤ γ² for every logit."""
    torch.manual_seed(8)
    gamma = 3.0
    m = build_model("small-cnn", 1, 10, 28, lcnn=True, bn_gamma=gamma)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        x = torch.rand(32, 1, 28, 28)
        F.cross_entropy(m(x), torch.randint(0, 10, (32,))).backward()
        opt.step()
    m.eval()
    x = torch.rand(64, 1, 28, 28, requires_grad=True)
    for c in range(10):
        (g,) = torch.autograd.grad(m(x)[:, c].sum(), x)
        assert g.flatten(1).norm(dim=1).max() <= gamma**2 * (1 + 1e-2)


def test_lcnn_training_step_is_deterministic():
    def step():
        torch.manual_seed(9)
        m = build_model("small-cnn", 1, 10, 28, lcnn=True)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return m.state_dict()

    a, b = step(), step()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_model_options_are_config_errors():
    with pytest.raises(ConfigError, match="activation"):
        build_model("small-cnn", 1, 10, 28, activation="tanh")
    with pytest.raises(ConfigError, match="beta"):
        build_model("small-cnn", 1, 10, 28, activation="centered_softplus", beta=0.0)
    with pytest.raises(ConfigError, match="needs activation"):
        build_model("small-cnn", 1, 10, 28, beta=2.0)
    with pytest.raises(ConfigError, match="bn_gamma"):
        build_model("resnet18-cifar", 3, 10, 32, bn_gamma=-1.0)
    with pytest.raises(ConfigError, match="takes no model options"):
        build_model("torchvision:resnet18", 3, 10, 32, spectral_norm=True)
    with pytest.raises(ConfigError, match="bad model options"):
        build_model("small-cnn", 1, 10, 28, dropout=0.5)
