"""Exact per-sample gradient norms without a per-sample loop ("book-keeping" / ghost norms).

For a loss that is a sum of per-sample terms, the gradient of layer l's weight for sample b
is a function of that sample's layer input a_b and output gradient g_b alone:

* Linear (input [T, d_in] per sample, T = 1 for a plain vector): grad = sum_t g_t a_tᵀ, and
  ||grad||² = sum_{t,s} (a_t·a_s)(g_t·g_s) (ghost norm, cost T²(d_in + d_out)) or
  ||gᵀa||_F² (materialised, cost T·d_in·d_out); the cheaper is used.
* Conv2d is a Linear over im2col patches (unfold), T = output positions.
* BatchNorm in eval mode is a per-channel affine map of x̂ = (x - running_mean)/sqrt(var+eps):
  grad_weight[c] = sum_hw g·x̂, grad_bias[c] = sum_hw g.

One forward and one backward pass (to the layer outputs only, no parameter gradients are
accumulated) give every sample's exact norm over all parameters. A model with parameters in
any other kind of module is handled by ``torch.func`` (vmap over per-sample grads): exact,
slower, and said in a warning rather than silently approximated.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


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


def per_sample_grad_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             loss_fn: Callable = F.cross_entropy) -> torch.Tensor:
    """||∇_θ loss(f(x_b), y_b)||² over all trainable parameters, per sample, float [B].

    ``model`` must be in eval mode (samples are then independent). ``loss_fn(logits, y,
    reduction="sum")`` is the per-sample loss summed over the batch.
    """
    mods, ok = _param_modules(model)
    if not ok:
        bad = sorted({type(m).__name__ for m in mods if not _supported(m)})
        warnings.warn(f"per-sample gradient norms: no book-keeping rule for {bad}; using torch.func (exact, slower)")
        return _func_grad_sq_norms(model, x, y, loss_fn)
    inputs, outputs, versions = {}, {}, {}

    def hook(module, args, out):
        inputs[module] = args[0].detach()
        outputs[module] = out
        versions[module] = out._version

    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        with no_inplace(model):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if any(outputs[m]._version != versions[m] for m in mods):
        # an in-place op we could not switch off (F.relu(..., inplace=True) in forward code)
        # overwrote a layer output, so its gradient would belong to another tensor
        warnings.warn("per-sample gradient norms: a layer output is modified in place; using torch.func")
        return _func_grad_sq_norms(model, x, y, loss_fn)
    loss = loss_fn(logits.float(), y, reduction="sum")
    grads = torch.autograd.grad(loss, [outputs[m] for m in mods])
    total = torch.zeros(len(x), dtype=torch.float32 if x.dtype != torch.float64 else torch.float64, device=x.device)
    for m, g in zip(mods, grads):
        total = total + _layer_sq_norm(m, inputs[m], g.detach()).to(total.dtype)
    return total


class no_inplace:
    """Context manager: switch ``inplace=True`` activations (nn.ReLU(inplace=True) in
    torchvision's ResNets) off for the block, so hooked layer outputs stay intact."""

    def __init__(self, model: nn.Module):
        self.mods = [m for m in model.modules() if getattr(m, "inplace", False) is True]

    def __enter__(self):
        for m in self.mods:
            m.inplace = False

    def __exit__(self, *exc):
        for m in self.mods:
            m.inplace = True


def _layer_sq_norm(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        B = a.shape[0]
        a, g = a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1])
        out = _weight_sq_norm(a, g) if m.weight.requires_grad else 0
        return out + (g.sum(1).pow(2).sum(1) if m.bias is not None and m.bias.requires_grad else 0)
    if isinstance(m, nn.Conv2d):
        patches = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # [B, d_in*k*k, T]
        g = g.flatten(2)                                                        # [B, d_out, T]
        out = _weight_sq_norm(patches.transpose(1, 2), g.transpose(1, 2)) if m.weight.requires_grad else 0
        return out + (g.sum(2).pow(2).sum(1) if m.bias is not None and m.bias.requires_grad else 0)
    # BatchNorm in eval mode: per-channel affine of the normalised input
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
    reduce = tuple(range(2, a.dim()))
    gw = (g * xhat).sum(reduce) if reduce else g * xhat
    gb = g.sum(reduce) if reduce else g
    out = gw.pow(2).sum(1) if m.weight is not None and m.weight.requires_grad else 0
    return out + (gb.pow(2).sum(1) if m.bias is not None and m.bias.requires_grad else 0)


def _weight_sq_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||sum_t g_t a_tᵀ||_F² per sample for a [B, T, d_in], g [B, T, d_out]."""
    B, T, d_in = a.shape
    d_out = g.shape[2]
    if T == 1:
        return a[:, 0].pow(2).sum(1) * g[:, 0].pow(2).sum(1)
    if T * T * (d_in + d_out) < T * d_in * d_out:  # ghost norm is cheaper
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))


def _func_grad_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def one(p, xb, yb):
        out = functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        return loss_fn(out.float(), yb.unsqueeze(0), reduction="sum")

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return sum(v.flatten(1).pow(2).sum(1) for v in g.values())
