"""The streamed, chunked per-sample gradient norms of engine.scores.pergrad: every conv method
and chunk size against a float64 per-sample backward() loop, on a ResNet with BatchNorm,
residuals, strided 1x1 shortcuts and in-place ReLUs; and the input-gradient scorers' model
state handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.models import build_model
from engine.scores import SCORERS, pergrad, score_batch
from engine.scores.pergrad import per_sample_grad_sq_norms
from tests.test_scorers_exact import brute_grand, data, make_model, rel_err


def small_resnet(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet18-cifar", 3, 5, 8, width=4).double()
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(2):
            model(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    return model.eval()


def resnet_data(n=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


@pytest.fixture(scope="module")
def resnet_ref():
    model, (x, y) = small_resnet(), resnet_data()
    return model, x, y, brute_grand(model, x, y).pow(2)


@pytest.mark.parametrize("method", pergrad.CONV_METHODS)
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_every_method_and_chunking_matches_brute_force_on_resnet(resnet_ref, method, chunk_bytes):
    model, x, y, ref = resnet_ref
    stats = {}
    got = per_sample_grad_sq_norms(model, x, y, conv_method=method, chunk_bytes=chunk_bytes, stats=stats)
    assert rel_err(got, ref) < 1e-4
    layers = stats["layers"]
    n_param_modules = sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    assert len(layers) == n_param_modules  # every layer once, one backward
    if chunk_bytes == 1:  # one sample per chunk wherever a temporary is needed
        assert all(n == len(x) for _, kind, n in layers if kind != "outer")
    if method != "auto":
        assert all(kind == method for _, kind, _ in layers if kind in ("unfold", "ghost", "conv"))
        conv_kinds = {kind for _, kind, _ in layers} - {"bn", "outer", "materialised"}
        assert conv_kinds == {method} or (method == "unfold" and conv_kinds <= {"unfold", "materialised"})


def test_chunk_budget_bounds_chunk_size():
    model, (x, y) = small_resnet(), resnet_data(n=16)
    budget = 64 * 1024
    stats = {}
    per_sample_grad_sq_norms(model, x, y, conv_method="unfold", chunk_bytes=budget, stats=stats)
    chunks = {name: n for name, kind, n in stats["layers"] if kind == "unfold"}
    # the stem's patches alone: 8x8 positions x 27 values x 8 bytes = 13.8 KB per sample
    assert chunks["stem.0"] >= 16 * 64 * 27 * 8 // budget
    assert max(chunks.values()) > 1
    stats = {}
    per_sample_grad_sq_norms(model, x, y, conv_method="unfold", stats=stats)
    assert all(n == 1 for _, _, n in stats["layers"])  # default budget: one chunk at this size


def test_channels_last_and_auto_cost_model(resnet_ref):
    model, x, y, ref = resnet_ref
    model = model.to(memory_format=torch.channels_last)
    try:
        got = per_sample_grad_sq_norms(model, x.to(memory_format=torch.channels_last), y)
    finally:
        model.to(memory_format=torch.contiguous_format)
    assert rel_err(got, ref) < 1e-4
    conv = nn.Conv2d(64, 64, 3, padding=1)
    for dev in ("cpu", "cuda"):
        big = pergrad.conv_costs(conv, (1, 64, 32, 32), (1, 64, 32, 32), pergrad.COST[dev])
        small = pergrad.conv_costs(conv, (1, 64, 4, 4), (1, 64, 4, 4), pergrad.COST[dev])
        assert min(small, key=small.get) == "ghost"  # T² << K·O
        assert min(big, key=big.get) != "ghost"


def test_torchvision_resnet_with_inplace_relu():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 3, 4])
    got = SCORERS["grand"](model, x, y)
    assert rel_err(got, brute_grand(model, x, y)) < 1e-4
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_layer_used_twice_falls_back_exactly():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(72, 5)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))

    model, (x, y) = Twice().double().eval(), data()
    with pytest.warns(UserWarning, match="more than once"):
        got = SCORERS["grand"](model, x, y)
    assert rel_err(got, brute_grand(model, x, y)) < 1e-4


def test_frozen_layers_are_left_out():
    model, (x, y) = make_model("residual-softplus"), data()
    for p in model[0].parameters():
        p.requires_grad_(False)
    ref = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref.append(sum(p.grad.pow(2).sum() for p in model.parameters() if p.requires_grad).sqrt())
    model.zero_grad(set_to_none=True)
    assert rel_err(SCORERS["grand"](model, x, y), torch.stack(ref).detach()) < 1e-4


@pytest.mark.parametrize("method", ["unfold", "ghost", "conv"])
def test_bf16_every_method_within_documented_tolerance(method, monkeypatch):
    monkeypatch.setenv("WINNOW_GRAND_CONV", method)
    model64, model32 = small_resnet(), small_resnet().float()
    x, y = resnet_data(n=32)
    ref = SCORERS["grand"](model64, x, y).numpy()
    got = score_batch({"m": model32}, x.float(), y, [("grand", "m")], precision="bf16")["grand@m"]
    err = np.abs(got - ref) / ref
    assert np.median(err) < 1e-2 and err.max() < 1e-1, (np.median(err), err.max())


@pytest.mark.parametrize("name, kw", [("curvature", {}), ("nc", {"iters": 2}), ("nc", {"iters": 2, "hvp": "exact"}),
                                      ("grad_norm", {})])
def test_input_gradient_scorers_restore_requires_grad(name, kw):
    model, (x, y) = make_model("residual-softplus"), data()
    model[0].weight.requires_grad_(False)  # a caller's own frozen parameter stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    SCORERS[name](model, x, y, **kw)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == tf32


def test_input_gradient_scorers_form_no_parameter_gradients():
    model, (x, y) = make_model("residual-softplus"), data()
    seen = []
    hooks = [p.register_hook(lambda g: seen.append(1)) for p in model.parameters()]
    try:
        SCORERS["curvature"](model, x, y)
        SCORERS["nc"](model, x, y, iters=1)
    finally:
        for h in hooks:
            h.remove()
    assert not seen
