"""Training regularisers on the input-space geometry of the loss, per sample and differentiable
with respect to the model's parameters (double backward).

* ``curvature_penalty``: SLo-Curves' ``Curv(X)`` (Garg & Roy, CVPR 2023), trained as
  ``CE + λ·Curv(X)`` with λ searched over ``SLO_CURVES_LAMBDAS``.
* ``gradreg_penalty``: GradReg, the squared input-gradient norm of the loss (Ross &
  Doshi-Velez 2018, the "GradReg" row of LCNN, Srinivas et al., NeurIPS 2022).
* ``build_penalty``: the trainer's entry point, ``None`` or a per-sample ``λ·Curv + μ·GradReg``
  so that the loss can be ``mean_b w_b·(CE_b + penalty_b)``.

Everything is in the model's (normalised) input units, like the scorers in
``engine.scores.model_scores``.

BatchNorm and dropout: both penalties are evaluated with the model in **eval mode** (BatchNorm
uses its running statistics, dropout is off), the model's own per-module training flags
restored afterwards. This is what the reference implementations of the regulariser family do
(CURE, ``net.eval()`` in its regulariser, and the SLo-Curves authors' curvature code), and it
has three consequences we rely on:

1. the penalty's extra forward passes never update BatchNorm's running statistics (nor
   ``num_batches_tracked``): after a step with λ > 0 the buffers are exactly those left by the
   trainer's own train-mode CE forward (``tests/test_regularizers.py`` checks this);
2. each sample's penalty is its own: in train mode BatchNorm's batch statistics would couple
   the input gradients of different samples, so per-sample weights would be ill-defined;
3. ``curvature_penalty`` equals the ``curvature`` scorer (same eps) on the same model.

What differs from a train-mode penalty: gradients reach BatchNorm's affine weights and every
other parameter, but not the batch statistics (running statistics are buffers, not
parameters), and early in training the running statistics lag the batch statistics that the
CE term sees.

Distributed training: a ``DistributedDataParallel`` (or ``DataParallel``) model is unwrapped
and the penalty runs on ``model.module``; its parameter gradients are summed with the CE
term's in the same ``backward()`` before DDP's per-parameter hooks fire, so the all-reduce
still sees one gradient per parameter.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from engine.scores.model_scores import curvature_difference, eval_mode, loss_input_grad
from engine.units import L_INF_STEP, input_units  # noqa: F401  (input_units: re-exported for callers of this module)

# SLo-Curves: "λ is a hyperparameter, searched over {0, 0.5, 1, 5, 10, 20, 50}".
SLO_CURVES_LAMBDAS = (0.0, 0.5, 1.0, 5.0, 10.0, 20.0, 50.0)

# The scorer's convention: Curv's step per input coordinate is 8/255 in [0, 1] pixel units.
DEFAULT_CURVATURE_EPS = L_INF_STEP

PenaltyFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def penalty_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block; every submodule's own ``training`` flag restored after (a
    module the caller froze in eval mode stays frozen).

    BatchNorm's running statistics are swapped for private copies (same values) during the
    block: the penalty's graph keeps them for the backward pass, and PyTorch does not notice
    when a later train-mode forward updates the real buffers in place (their version counter
    is not checked), so a penalty computed *before* the CE forward would otherwise get a
    silently wrong parameter gradient. The real buffers are put back unchanged.
    """
    swapped = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            swapped.append((m, m.running_mean, m.running_var))
            m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
    try:
        with eval_mode(model):
            yield model
    finally:
        for m, mean, var in swapped:
            m.running_mean, m.running_var = mean, var


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else the
    model itself): the penalty's extra forwards and input gradients must not go through DDP."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def curvature_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      eps: float = DEFAULT_CURVATURE_EPS) -> torch.Tensor:
    """SLo-Curves ``Curv(X) = ||∇_x[L(X + h·v) − L(X)]||_2`` per sample, [B] in x's dtype,
    differentiable with respect to the model's parameters.

    ``v = sign(∇_x L(X)) / ||sign(∇_x L(X))||_2`` and ``h = eps·sqrt(D)`` (D = input size), so
    every coordinate moves by ``eps`` in the model's input units ("Hyperparameter h chosen to
    match per pixel changes in L_inf adversarial attacks"): exactly the ``curvature`` scorer's definition, no
    division by h. For 8/255 in [0, 1] pixel units pass ``input_units(8/255, std)``.

    Both input gradients are taken with ``create_graph=True``, so ``CE + λ·Curv`` back-propagates
    through them (double backward). The direction v is treated as a constant (detached): the
    sign is piecewise constant in the parameters, its derivative is zero almost everywhere, and
    the paper's reference regulariser (CURE, whose estimator SLo-Curves adopts) detaches it too.
    Evaluated in eval mode (see the module docstring for BatchNorm).
    """
    model = unwrap(model)
    with penalty_mode(model), torch.enable_grad():
        g0 = loss_input_grad(model, x, y, create_graph=True)
        return curvature_difference(model, x, y, g0, torch.sign(g0.detach()), eps, create_graph=True)


def gradreg_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GradReg, ``||∇_x CE(f(x_b), y_b)||_2²`` per sample, [B] in x's dtype, differentiable
    with respect to the model's parameters (double backward).

    The quantity is the *squared* ℓ2 norm of the input gradient of the *loss* (not of a logit):
    the input-gradient regulariser ("double backpropagation") of Ross & Doshi-Velez (AAAI 2018),
    which penalises the sum over input coordinates of the squared partial derivatives of the
    cross-entropy; it is what LCNN's "GradReg [31]" row trains
    (the LCNN reference ``GradNormRegularizedLoss`` differentiates the batch-mean CE and scales
    by 1e5, i.e. ``1e5/B² · mean_b GradReg_b``: its constant c corresponds to ``μ = c·1e5/B²``,
    e.g. 0.0061 for its c = 1e-3 at B = 128). Model input units; eval mode (module docstring).
    """
    model = unwrap(model)
    with penalty_mode(model), torch.enable_grad():
        return loss_input_grad(model, x, y, create_graph=True).flatten(1).pow(2).sum(1)


@dataclass(frozen=True)
class Penalty:
    """Per-sample ``λ·Curv(x_b) + μ·GradReg(x_b)``, a picklable callable ``(model, x, y) -> [B]``.

    Terms with a zero weight are not computed (their contribution is exactly zero); when both
    are on, the clean input gradient is computed once and shared.
    """

    curvature_lambda: float = 0.0                # λ, SLo-Curves (grid: SLO_CURVES_LAMBDAS)
    gradreg_mu: float = 0.0                      # μ, GradReg weight
    curvature_eps: float = DEFAULT_CURVATURE_EPS  # Curv's per-coordinate step, model input units

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        if not (self.curvature_lambda or self.gradreg_mu):
            return total
        model = unwrap(model)
        with penalty_mode(model), torch.enable_grad():
            g0 = loss_input_grad(model, x, y, create_graph=True)
            if self.gradreg_mu:
                total = total + self.gradreg_mu * g0.flatten(1).pow(2).sum(1)
            if self.curvature_lambda:
                curv = curvature_difference(model, x, y, g0, torch.sign(g0.detach()), self.curvature_eps,
                                            create_graph=True)
                total = total + self.curvature_lambda * curv
        return total


def build_penalty(curvature_lambda: float = 0.0, gradreg_mu: float = 0.0,
                  curvature_eps: float = DEFAULT_CURVATURE_EPS) -> Optional[Penalty]:
    """``None`` when both weights are 0 (train with plain CE), else a ``Penalty``: a callable
    ``(model, x, y) -> Tensor[B]`` giving ``λ·Curv(x_b) + μ·GradReg(x_b)`` per sample, so that
    the trainer can weight samples: ``loss = mean_b w_b·(CE_b + penalty_b)``.

    ``curvature_eps`` is in the model's (normalised) input units, the scorer's convention: the
    default 8/255 is right for unnormalised [0, 1] inputs; for 8/255 in pixel units on
    normalised data pass ``input_units(8/255, info.std)`` = (8/255)/mean(std).
    Raises ValueError for a negative or non-finite weight or a non-positive eps with λ > 0.
    """
    for name, value in (("curvature_lambda", curvature_lambda), ("gradreg_mu", gradreg_mu),
                        ("curvature_eps", curvature_eps)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if curvature_lambda > 0 and curvature_eps <= 0:
        raise ValueError(f"curvature_eps must be > 0 when curvature_lambda > 0, got {curvature_eps!r}")
    if curvature_lambda == 0 and gradreg_mu == 0:
        return None
    return Penalty(float(curvature_lambda), float(gradreg_mu), float(curvature_eps))
