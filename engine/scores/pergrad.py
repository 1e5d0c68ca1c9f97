"""Exact per-sample gradient norms without a per-sample loop ("book-keeping" / ghost norms).

For a loss that is a sum of per-sample terms, the gradient of layer l's weight for sample b
is a function of that sample's layer input a_b and output gradient g_b alone:

* Linear (input [T, d_in] per sample, T = 1 for a plain vector): grad = sum_t g_t a_tᵀ, and
  ||grad||² = sum_{t,s} (a_t·a_s)(g_t·g_s) (ghost norm) or ||gᵀa||_F² (materialised).
* Conv2d is a Linear over im2col patches (unfold), T = output positions, K = d_in·kh·kw.
* BatchNorm in eval mode is a per-channel affine map of x̂ = (x - running_mean)/sqrt(var+eps):
  grad_weight[c] = sum_hw g·x̂, grad_bias[c] = sum_hw g.

Streaming, one backward pass
----------------------------
A forward pass with hooks keeps every parameter layer's input (a detached alias of a tensor
autograd saves for its own backward anyway, so no extra memory) and registers a tensor hook on
the layer's output. ONE backward pass (``autograd.grad`` to the outputs of the "root" layers,
those whose input does not depend on any parameter; no parameter gradient is formed) calls each
hook as soon as that layer's output gradient exists: the hook adds the layer's per-sample
squared norm into a [B] total and drops the stored input. No output gradient outlives its
hook, and per-layer temporaries (im2col patches, per-sample weight gradients, Gram matrices)
are made in batch chunks of at most ``chunk_bytes`` (default ``CHUNK_BYTES``), so the peak is
the forward's activations plus one bounded temporary, like a training step.

Per-layer method (``conv_method="auto"``): cost model
-----------------------------------------------------
Per sample, with T output positions, K = d_in·kh·kw, O = d_out (counts in multiply-adds, memory
traffic weighted by ``mem_weight`` per element):

* ``unfold``: per-sample weight gradient ``gᵀ·patches`` by one batched GEMM on im2col patches:
  ``T·K·O + mem_weight·(2·T·K + O·K)`` (no patch copy for 1x1 unpadded convs: 0 instead of 2TK);
* ``ghost``: ``<aaᵀ, ggᵀ>`` with T×T Gram matrices: ``T²·(K + O) + mem_weight·(2·T·K + 3·T²)``;
* ``conv``: the per-sample weight gradient straight from the convolution library (cuDNN /
  oneDNN weight gradient of a grouped convolution with groups = batch, no unfold):
  ``conv_weight·T·K·O + mem_weight·(O·K)``, with ``conv_weight`` larger when a group has few
  input channels (the stem), where grouped kernels are inefficient.

The constants per device type are in ``COST``; on CPU they were fitted on ResNet-18-CIFAR layer
shapes (oneDNN's grouped weight gradient is several times faster than a batched GEMM there);
on CUDA ``conv`` is priced conservatively (cuDNN's grouped weight gradient with groups = B is
not tuned for that shape) so ``auto`` takes ``unfold`` for large feature maps and ``ghost``
for small ones (T² < K·O). ``conv_method`` (or ``WINNOW_GRAND_CONV``) forces one method, which
is how to measure them on a new device (``bench/scorers.py --grand-conv``).

Precision: under autocast (``jobs.score --precision bf16``) the products run in the autocast
dtype (set explicitly: hooks run on the autograd thread, where autocast is not active), every
reduction (squares, sums over positions and over the batch total) in float32. A float64 model
stays float64 end to end.

A model with parameters in any other kind of module, a parameter layer called more than once
per forward, or a stored layer input modified in place before its hook ran, is handled by
``torch.func`` (vmap over per-sample grads): exact, slower, and said in a warning rather than
silently approximated.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
CONV_METHODS = ("auto", "unfold", "ghost", "conv")
CHUNK_BYTES = 256 * 2**20  # temporary memory per layer computation (patches, products)
# cost model constants per device type: mem_weight (multiply-adds per element moved),
# conv_weight (grouped-convolution weight gradient vs batched GEMM per multiply-add), and the
# same when a group has fewer than 16 input channels
COST = {"cpu": {"mem_weight": 8.0, "conv_weight": 0.3, "conv_weight_thin": 8.0},
        "cuda": {"mem_weight": 32.0, "conv_weight": 2.0, "conv_weight_thin": 16.0}}


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return not module.training and module.track_running_stats and module.running_mean is not None
    return isinstance(module, nn.Linear)


def _param_modules(model: nn.Module) -> Tuple[List[nn.Module], bool]:
    """Modules that own trainable parameters directly, and whether all of them are supported."""
    mods = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return mods, all(_supported(m) for m in mods)


class _Plan:
    """Per-call settings shared by the layer hooks."""

    def __init__(self, device: torch.device, cdtype: Optional[torch.dtype], acc: torch.dtype,
                 chunk_bytes: int, conv_method: str, stats: Optional[dict]):
        self.device, self.cdtype, self.acc = device, cdtype, acc
        self.chunk_bytes, self.conv_method, self.stats = chunk_bytes, conv_method, stats
        self.cost = COST["cuda" if device.type == "cuda" else "cpu"]

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """Operand of a heavy product: the autocast dtype where autocast was on."""
        if self.cdtype is not None and t.dtype in (torch.float32, torch.float64) and t.dtype != self.cdtype:
            return t.to(self.cdtype)
        return t

    def chunks(self, n: int, per_sample_bytes: float) -> List[slice]:
        size = max(1, min(n, int(self.chunk_bytes // max(per_sample_bytes, 1.0))))
        return [slice(i, min(n, i + size)) for i in range(0, n, size)]

    def record(self, name: str, method: str, n_chunks: int) -> None:
        if self.stats is not None:
            self.stats.setdefault("layers", []).append((name, method, n_chunks))


def per_sample_grad_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             loss_fn: Callable = F.cross_entropy, *, chunk_bytes: Optional[int] = None,
                             conv_method: Optional[str] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """||∇_θ loss(f(x_b), y_b)||² over all trainable parameters, per sample, float [B].

    ``model`` must be in eval mode (samples are then independent). ``loss_fn(logits, y,
    reduction="sum")`` is the per-sample loss summed over the batch. ``chunk_bytes`` bounds each
    layer's temporary memory, ``conv_method`` is one of ``CONV_METHODS`` (default: the
    ``WINNOW_GRAND_CONV`` environment variable, else "auto"); ``stats``, a dict, receives
    ``layers``: (module name, method, number of batch chunks) per layer, in backward order.
    """
    conv_method = conv_method or os.environ.get("WINNOW_GRAND_CONV", "auto")
    if conv_method not in CONV_METHODS:
        raise ValueError(f"conv_method must be one of {CONV_METHODS}, got {conv_method!r}")
    mods, ok = _param_modules(model)
    if not ok:
        bad = sorted({type(m).__name__ for m in mods if not _supported(m)})
        return _fallback(model, x, y, loss_fn, f"no book-keeping rule for {bad} (exact, slower)")
    x = x.detach()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device.type
    cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    rec = _Recorder(model, mods, _Plan(x.device, cdtype, acc, chunk_bytes or CHUNK_BYTES, conv_method, stats),
                    len(x), acc)
    logits = rec.forward(x)
    reason = rec.why_not()
    if reason:
        del logits
        rec.clear()
        return _fallback(model, x, y, loss_fn, reason)
    loss = loss_fn(logits.float(), y, reduction="sum")
    del logits
    torch.autograd.grad(loss, rec.roots, allow_unused=True)
    del loss
    rec.clear()  # layers whose output does not reach the loss: zero gradient
    if rec.bad:
        return _fallback(model, x, y, loss_fn, f"the input of {rec.bad} is modified in place")
    return rec.total


def _fallback(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, reason: str) -> torch.Tensor:
    """The exact norms by torch.func, when the book-keeping cannot apply (``reason`` warned)."""
    warnings.warn(f"per-sample gradient norms: {reason}; using torch.func")
    return _func_grad_sq_norms(model, x, y, loss_fn)


class _Recorder:
    """One forward pass with hooks on the parameter layers ``mods``: each layer's input is kept
    and, when its output's gradient arrives in the backward pass, the layer's per-sample squared
    gradient norm is added to ``total``. ``roots`` are the outputs of the layers that read the
    input directly (the backward pass starts there); ``bad`` names layers whose kept input was
    modified in place after they ran."""

    def __init__(self, model: nn.Module, mods: list, plan: "_Plan", n: int, acc: torch.dtype):
        self.model, self.mods, self.plan, self.acc = model, mods, plan, acc
        self.names = {m: name for name, m in model.named_modules()}
        self.total = torch.zeros(n, dtype=acc, device=plan.device)
        self.calls = {m: 0 for m in mods}
        self.roots: List[torch.Tensor] = []
        self.bad: List[str] = []
        self.pending: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handles = [m.register_forward_hook(self._fwd_hook) for m in self.mods]
        try:
            return self.model(x)
        finally:
            for h in handles:
                h.remove()

    def why_not(self) -> Optional[str]:
        """Why the book-keeping cannot give the norms of this forward, or None."""
        if any(c > 1 for c in self.calls.values()):
            many = sorted({self.names[m] or type(m).__name__ for m, c in self.calls.items() if c > 1})
            return f"layers {many} run more than once per forward"
        if not self.roots:  # every parameter layer's input already depends on a parameter
            return "no layer reads the input directly"
        return None

    def clear(self) -> None:
        self.roots.clear()
        self.pending.clear()

    def _fwd_hook(self, module, args, out):
        self.calls[module] += 1
        if self.calls[module] > 1 or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        key = object()
        a = args[0].detach()
        self.pending[key] = (module, a, a._version)
        # the hook sees the gradient of this value even if `out` is later modified in place
        out.register_hook(lambda g: self._grad_hook(key, g))
        if not args[0].requires_grad:
            self.roots.append(out)

    def _grad_hook(self, key, g):
        m, a, version = self.pending.pop(key)
        if a._version != version:  # the stored input changed in place after the layer ran
            self.bad.append(self.names[m])
            return None
        dev = a.device.type
        with torch.autocast(dev, enabled=False), torch.no_grad():
            sq = _layer_sq_norm(m, a, g.detach(), self.plan, self.names[m])
            if isinstance(sq, torch.Tensor):
                self.total.add_(sq.to(self.acc))
        return None


class no_inplace:
    """Context manager: switch ``inplace=True`` activations (nn.ReLU(inplace=True) in
    torchvision's ResNets) off for the block. No longer needed by the streamed norms (a tensor
    hook registered before an in-place op receives the gradient of the value it was registered
    on); kept for callers that hook layer outputs themselves."""

    def __init__(self, model: nn.Module):
        self.mods = [m for m in model.modules() if getattr(m, "inplace", False) is True]

    def __enter__(self):
        for m in self.mods:
            m.inplace = False

    def __exit__(self, *exc):
        for m in self.mods:
            m.inplace = True


def _layer_sq_norm(m: nn.Module, a: torch.Tensor, g: torch.Tensor, plan: _Plan, name: str = "") -> torch.Tensor:
    if isinstance(m, nn.Linear):
        B = a.shape[0]
        rows_a, rows_g = a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1])
        out = 0
        if m.weight.requires_grad:
            out = _rows_sq_norm(rows_a, rows_g, plan, name)
        if m.bias is not None and m.bias.requires_grad:
            out = out + rows_g.sum(1, dtype=plan.acc).square().sum(1)
        return out
    if isinstance(m, nn.Conv2d):
        out = _conv_weight_sq_norm(m, a, g, plan, name) if m.weight.requires_grad else 0
        if m.bias is not None and m.bias.requires_grad:
            out = out + g.sum((2, 3), dtype=plan.acc).square().sum(1)
        return out
    return _bn_sq_norm(m, a, g, plan, name)


def _bn_sq_norm(m, a, g, plan: _Plan, name: str) -> torch.Tensor:
    """BatchNorm in eval mode: per (sample, channel) ``sum g·x̂`` and ``sum g`` from the fused
    BatchNorm backward kernel run on the batch folded into channels ([1, b·C, ...], running
    statistics repeated b times): one read of a and g in their own dtype, float32 accumulation
    and float32 results (float64 for a float64 model)."""
    B, C = a.shape[:2]
    want_w = m.weight is not None and m.weight.requires_grad
    want_b = m.bias is not None and m.bias.requires_grad
    if not (want_w or want_b):
        return 0
    stat = plan.acc
    mean, var = m.running_mean.to(stat), m.running_var.to(stat)
    parts = []
    per = 2 * a[0].numel() * a.element_size()  # contiguous copies of a chunk, channels-last input
    for sl in plan.chunks(B, per):
        ac, gc = a[sl], g[sl]
        b = ac.shape[0]
        if gc.dtype != ac.dtype:
            gc = gc.to(ac.dtype)
        ac = ac.contiguous().view(1, b * C, *ac.shape[2:])
        gc = gc.contiguous().view(1, b * C, *gc.shape[2:])
        try:
            _, gw, gb = torch.ops.aten.native_batch_norm_backward(
                gc, ac, None, mean.repeat(b), var.repeat(b), None, None, False, m.eps, [False, want_w, want_b])
        except (RuntimeError, NotImplementedError):  # a dtype mix without a fused kernel
            gw, gb = _bn_parts(ac, gc, mean.repeat(b), var.repeat(b), m.eps, stat)
        out = 0
        if want_w:
            out = out + gw.to(stat).view(b, C).square().sum(1)
        if want_b:
            out = out + gb.to(stat).view(b, C).square().sum(1)
        parts.append(out)
    plan.record(name, "bn", len(parts))
    return torch.cat(parts)


def _bn_parts(a, g, mean, var, eps, acc):
    """Reference formula of ``_bn_sq_norm``'s kernel: [C] sums of g·x̂ and g over the rest."""
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a.to(acc) - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    reduce = (0,) + tuple(range(2, a.dim()))
    return (g.to(acc) * xhat).sum(reduce), g.to(acc).sum(reduce)


def _rows_sq_norm(a: torch.Tensor, g: torch.Tensor, plan: _Plan, name: str) -> torch.Tensor:
    """||sum_t g_t a_tᵀ||_F² per sample for a [B, T, d_in], g [B, T, d_out] (any strides)."""
    B, T, d_in = a.shape
    d_out = g.shape[2]
    acc = plan.acc
    if T == 1:
        plan.record(name, "outer", 1)
        return a[:, 0].to(acc).square().sum(1) * g[:, 0].to(acc).square().sum(1)
    if T * T * (d_in + d_out) < T * d_in * d_out:
        return _ghost(a, g, plan, name, copy_elems=0)
    return _materialised(a, g, plan, name, copy_elems=0)


def _esize(plan: _Plan, t: torch.Tensor) -> int:
    return (plan.cdtype or t.dtype).itemsize


def _sq_sum(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    t = t.flatten(1)
    t = t.to(acc) if t.dtype != acc else t
    return t.square_().sum(1)


def _materialised(a, g, plan: _Plan, name: str, copy_elems: int, patches=None) -> torch.Tensor:
    """Per-sample gradient gᵀa by batched GEMM; ``patches(sl)`` builds the rows of a chunk."""
    B, T, O = g.shape
    K = a.shape[2] if patches is None else copy_elems // T
    es = _esize(plan, g)
    per = (copy_elems + T * O) * es + O * K * (es + torch.finfo(plan.acc).bits // 8)
    parts = []
    for sl in plan.chunks(B, per):
        ac = plan.cast(a[sl] if patches is None else patches(sl))
        gc = plan.cast(g[sl])
        parts.append(_sq_sum(torch.bmm(gc.transpose(1, 2), ac), plan.acc))
    plan.record(name, "unfold" if patches is not None else "materialised", len(parts))
    return torch.cat(parts)


def _ghost(a, g, plan: _Plan, name: str, copy_elems: int, patches=None) -> torch.Tensor:
    B, T, O = g.shape
    es = _esize(plan, g)
    per = (copy_elems + T * O) * es + T * T * (2 * es + 4)
    parts = []
    for sl in plan.chunks(B, per):
        ac = plan.cast(a[sl] if patches is None else patches(sl))
        gc = plan.cast(g[sl])
        ga = torch.bmm(ac, ac.transpose(1, 2))
        gg = torch.bmm(gc, gc.transpose(1, 2))
        del ac
        parts.append((ga.to(plan.acc).mul_(gg.to(plan.acc))).sum((1, 2)) if ga.dtype != plan.acc
                     else ga.mul_(gg).sum((1, 2)))
    plan.record(name, "ghost", len(parts))
    return torch.cat(parts)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H·W, C]: a view for contiguous and channels-last tensors alike."""
    B, C = t.shape[:2]
    return t.permute(0, 2, 3, 1).reshape(B, -1, C)


def conv_costs(m: nn.Conv2d, a_shape, g_shape, cost: dict) -> dict:
    """Per-sample cost of each exact method for one conv layer (see the module docstring)."""
    C, O = a_shape[1], g_shape[1]
    kh, kw = m.kernel_size
    T = g_shape[2] * g_shape[3]
    K = C * kh * kw
    w = cost["mem_weight"]
    pointwise = (kh, kw) == (1, 1) and tuple(m.padding) == (0, 0)
    patch = 0 if pointwise else 2 * T * K
    conv_w = cost["conv_weight"] if C >= 16 else cost["conv_weight_thin"]
    return {"unfold": T * K * O + w * (patch + O * K),
            "ghost": T * T * (K + O) + w * (patch + 3 * T * T),
            "conv": conv_w * T * K * O + w * O * K}


def _conv_weight_sq_norm(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, plan: _Plan, name: str) -> torch.Tensor:
    C = a.shape[1]
    kh, kw = m.kernel_size
    T = g.shape[2] * g.shape[3]
    K = C * kh * kw
    method = plan.conv_method
    if method == "auto":
        costs = conv_costs(m, a.shape, g.shape, plan.cost)
        method = min(costs, key=costs.get)
    if method == "conv":
        return _grouped_conv(m, a, g, plan, name)
    pointwise = (kh, kw) == (1, 1) and tuple(m.padding) == (0, 0)
    if pointwise:
        sh, sw = m.stride
        src = a if (sh, sw) == (1, 1) else a[:, :, ::sh, ::sw][:, :, :g.shape[2], :g.shape[3]]
        rows_a, copy, patches = _rows(src), 0, None
    else:
        rows_a, copy = None, T * K

        def patches(sl):  # [b, T, K]
            return F.unfold(plan.cast(a[sl]), m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
    rows_g = _rows(g)
    fn = _ghost if method == "ghost" else _materialised
    if patches is None:
        return fn(rows_a, rows_g, plan, name, copy_elems=0)
    return fn(rows_g.new_empty(0), rows_g, plan, name, copy_elems=copy, patches=patches)


def _grouped_conv(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, plan: _Plan, name: str) -> torch.Tensor:
    """Per-sample weight gradients from the convolution library: the weight gradient of a
    convolution with groups = chunk size over the chunk stacked along channels."""
    B, C, H, W = a.shape
    O, Ho, Wo = g.shape[1:]
    kh, kw = m.kernel_size
    es = _esize(plan, g)
    per = (C * H * W + O * Ho * Wo) * es + O * C * kh * kw * (es + torch.finfo(plan.acc).bits // 8)
    parts = []
    for sl in plan.chunks(B, per):
        ac, gc = plan.cast(a[sl]), plan.cast(g[sl])
        b = ac.shape[0]
        dtype = torch.promote_types(ac.dtype, gc.dtype)
        ac = ac.to(dtype).contiguous().view(1, b * C, H, W)
        gc = gc.to(dtype).contiguous().view(1, b * O, Ho, Wo)
        weight = gc.new_empty(1).expand(b * O, C, kh, kw)  # shape only, as torch.nn.grad.conv2d_weight
        w = torch.ops.aten.convolution_backward(
            gc, ac, weight, None, list(m.stride), list(m.padding), list(m.dilation),
            False, [0, 0], b, [False, True, False])[1]
        parts.append(_sq_sum(w.view(b, -1), plan.acc))
    plan.record(name, "conv", len(parts))
    return torch.cat(parts)


def _func_grad_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def one(p, xb, yb):
        out = functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        return loss_fn(out.float(), yb.unsqueeze(0), reduction="sum")

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return sum(v.flatten(1).pow(2).sum(1) for v in g.values())
