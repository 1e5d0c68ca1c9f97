"""Robustness and model-geometry metrics of a trained model on an ``ArraySplit`` (LCNN,
Srinivas et al., NeurIPS 2022: the model-geometry table and ℓ2 PGD robust accuracy).

Units: PGD radii and steps are ℓ2 norms in **[0, 1] pixel space** (the image divided by 255,
before mean/std normalisation), as in the paper's ``||ε||_2 ∈ {0.05, 0.1, 0.15, 0.2}``; the
geometry (gradients and Hessians of the labelled class's logit) is taken with respect to the
model's **normalised** input ``(x/255 − mean)/std``, as the scorers in
``engine.scores.model_scores`` take it. Pure PyTorch; no Ray.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.data import ArraySplit, DataInfo
from engine.scores.model_scores import eval_mode, geometry

# LCNN's robustness table: ℓ2 PGD at these radii, [0, 1] pixel units.
LCNN_PGD_EPS = (0.05, 0.1, 0.15, 0.2)


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, y, reduction="none")


def _per_sample(n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return n.view(-1, *[1] * (like.dim() - 1))


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def _project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Each sample's delta scaled onto the ℓ2 ball of radius eps (unchanged if inside)."""
    scale = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * _per_sample(scale, delta)


def _random_in_ball(x: torch.Tensor, eps: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A uniform draw from each sample's ℓ2 ball of radius eps (Gaussian direction, radius
    eps·U^(1/D)); drawn on the CPU so that a seed gives the same start on every device."""
    d = x[0].numel()
    z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    u = torch.rand(len(x), generator=generator, dtype=torch.float64)
    z = z / _per_sample(_flat_norm(z).clamp_min(1e-12), z) * _per_sample(eps * u ** (1.0 / d), z)
    return z.to(device=x.device, dtype=x.dtype)


def pgd_l2(model: nn.Module, x01: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 20,
           step_size: Optional[float] = None, normalize_fn: Callable[[torch.Tensor], torch.Tensor],
           random_start: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ℓ2 PGD maximising cross-entropy, in [0, 1] pixel space. Returns x_adv [B, C, H, W],
    detached, with ``||x_adv − x01||_2 ≤ eps`` per sample and values in [0, 1].

    x01: float [B, C, H, W] in [0, 1]; the model sees ``normalize_fn(x)``. Each step moves by
    ``step_size`` (default ``2.5·eps/steps``, Madry et al.) along the per-sample ℓ2-normalised
    loss gradient, projects onto the eps-ball around x01 and clips to [0, 1] (clipping a point
    of the ball towards x01's box keeps it in the ball). ``random_start``: begin at a uniform
    point of the ball (seeded by ``generator``) instead of at x01. Returns, per sample, the
    iterate with the highest loss among all visited points *including x01*, so the attack never
    lowers a sample's loss. The model runs in eval mode (previous per-module modes restored;
    BatchNorm running statistics untouched); its parameters get no gradient.
    """
    if eps < 0 or steps < 0:
        raise ValueError(f"pgd_l2 needs eps >= 0 and steps >= 0, got eps={eps!r}, steps={steps!r}")
    step = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)
    x01 = x01.detach()
    with eval_mode(model), torch.enable_grad():
        best = x01.clone()
        best_loss = torch.full((len(x01),), -float("inf"), dtype=torch.float64, device=x01.device)
        x = x01.clone()
        if random_start and eps > 0:  # x01 itself stays a candidate
            with torch.no_grad():
                best_loss = _ce(model, normalize_fn(x01), y).double()
            x = (x01 + _random_in_ball(x01, eps, generator)).clamp(0.0, 1.0)
        for k in range(steps + 1):
            x = x.detach().requires_grad_(k < steps)
            loss = _ce(model, normalize_fn(x), y)
            better = loss.detach().double() > best_loss
            best = torch.where(_per_sample(better, x), x.detach(), best)
            best_loss = torch.where(better, loss.detach().double(), best_loss)
            if k == steps:
                break
            (g,) = torch.autograd.grad(loss.sum(), x)
            x = x.detach() + step * g / _per_sample(_flat_norm(g).clamp_min(1e-30), g)
            x = (x01 + _project(x - x01, eps)).clamp(0.0, 1.0)
    return best.detach()


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _unit_images(images: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, H, W, C] -> [0, 1] pixel space [B, C, H, W] in ``dtype`` on ``device``."""
    t = torch.as_tensor(images).to(device)
    return t.permute(0, 3, 1, 2).to(dtype).div(255.0).contiguous()


def normalizer(info: DataInfo, device: torch.device, dtype: torch.dtype = torch.float32):
    """``x01 -> (x01 − mean)/std`` per channel: the model's input from [0, 1] pixel space."""
    m = torch.tensor(info.mean, dtype=dtype, device=device).view(1, -1, 1, 1)
    s = torch.tensor(info.std, dtype=dtype, device=device).view(1, -1, 1, 1)
    return lambda x01: (x01 - m) / s


def _head(split: ArraySplit, max_samples: Optional[int], who: str) -> ArraySplit:
    """The first ``max_samples`` rows (all if None or 0); ValueError if that leaves none."""
    n = len(split) if not max_samples else min(int(max_samples), len(split))
    if n <= 0:
        raise ValueError(f"{who} needs at least one sample (split has {len(split)}, max_samples={max_samples})")
    return ArraySplit(split.sample_id[:n], split.image[:n], split.label[:n])


def robust_accuracy(model: nn.Module, split: ArraySplit, info: DataInfo, device: torch.device,
                    eps_list: Sequence[float] = LCNN_PGD_EPS, steps: int = 20,
                    step_size: Optional[float] = None, max_samples: Optional[int] = None,
                    batch_size: int = 256, random_start: bool = False, seed: int = 0,
                    cumulative: bool = True) -> Dict[float, float]:
    """ℓ2 PGD robust accuracy ``{eps: fraction in [0, 1]}`` on the first ``max_samples`` rows
    of ``split``; the dict always holds ``0.0`` = clean accuracy, then each eps of ``eps_list``
    ([0, 1] pixel units, LCNN's 0.05, 0.1, 0.15, 0.2 by default).

    PGD: ``steps`` iterations (default 20) of step ``step_size`` (default 2.5·eps/steps; the
    LCNN text gives no attack schedule, this is Madry et al.'s rule), see ``pgd_l2``.
    ``cumulative`` (default): a sample counts as robust at eps only if it is classified
    correctly at its clean image and at the PGD point of every eps' ≤ eps of the list (each of
    those points lies inside the eps-ball, so this is a stronger, still valid, attack); the
    curve is then non-increasing and starts at the clean accuracy. ``cumulative=False``: the
    plain per-eps PGD accuracy. Eval mode; ``random_start`` seeded by ``seed``.
    """
    rows = _head(split, max_samples, "robust_accuracy")
    eps_sorted = sorted({0.0, *(float(e) for e in eps_list)})
    if eps_sorted[0] < 0:
        raise ValueError(f"PGD radii must be >= 0, got {list(eps_list)}")
    dtype = _model_dtype(model)
    norm = normalizer(info, device, dtype)
    gen = torch.Generator().manual_seed(seed)
    hits = {e: 0 for e in eps_sorted}
    with eval_mode(model):
        for b in rows.batches(batch_size):
            x01 = _unit_images(b["image"], device, dtype)
            y = torch.as_tensor(b["label"], device=device)
            alive = torch.ones(len(y), dtype=torch.bool, device=device)
            for e in eps_sorted:
                x = x01 if e == 0 else pgd_l2(model, x01, y, eps=e, steps=steps, step_size=step_size,
                                               normalize_fn=norm, random_start=random_start, generator=gen)
                with torch.no_grad():
                    ok = model(norm(x)).argmax(1) == y
                alive = alive & ok if cumulative else ok
                hits[e] += int(alive.sum())
    return {e: hits[e] / len(rows) for e in eps_sorted}


def geometry_metrics(model: nn.Module, split: ArraySplit, info: DataInfo, device: torch.device, *,
                     max_samples: Optional[int] = None, batch_size: int = 128, iters: int = 10,
                     hvp: str = "fd", fd_step: float = 1e-3, eps: float = 1e-6, seed: int = 0) -> dict:
    """LCNN's model-geometry table on the first ``max_samples`` rows of ``split``, for f the
    labelled class's logit and x the model's normalised input (as the scorers):

    ``grad_norm`` = E‖∇_x f‖₂, ``hessian_norm`` = E‖∇²_x f‖₂ (spectral norm, ``iters`` power
    iterations, ``hvp`` "fd" or "exact"), ``normalized_curvature`` = E C_f with
    ``C_f = ‖∇²f‖₂ / (‖∇f‖₂ + eps)`` averaged per sample, each with its per-sample standard
    deviation (``<key>_std``), plus ``accuracy`` on those rows and ``samples``. The per-sample
    numbers come from ``engine.scores.model_scores.geometry``, so the definitions are shared
    with the ``nc``/``grad_norm``/``hessian_norm`` scorers. Eval mode.
    """
    rows = _head(split, max_samples, "geometry_metrics")
    dtype = _model_dtype(model)
    norm = normalizer(info, device, dtype)
    parts: Dict[str, list] = {"grad_norm": [], "hessian_norm": [], "nc": []}
    hits = 0
    with eval_mode(model):
        for b in rows.batches(batch_size):
            x = norm(_unit_images(b["image"], device, dtype))
            y = torch.as_tensor(b["label"], device=device)
            geo = geometry(model, x, y, iters=iters, hvp=hvp, fd_step=fd_step, eps=eps, seed=seed)
            for k in parts:
                parts[k].append(geo[k].detach().double().cpu().numpy())
            with torch.no_grad():
                hits += int((model(x).argmax(1) == y).sum())
    out: dict = {}
    for key, name in (("grad_norm", "grad_norm"), ("hessian_norm", "hessian_norm"), ("nc", "normalized_curvature")):
        v = np.concatenate(parts[key])
        out[name], out[f"{name}_std"] = float(v.mean()), float(v.std())
    out["accuracy"] = hits / len(rows)
    out["samples"] = len(rows)
    return out
