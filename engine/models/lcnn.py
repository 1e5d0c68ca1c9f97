"""Low-curvature network (LCNN) building blocks (Srinivas, Matoba, Lakkaraju & Fleuret,
"Efficient Training of Low-Curvature Neural Networks", NeurIPS 2022; seeds/002).

The paper bounds a network's curvature by the curvatures and Lipschitz constants of its
layers and makes each of them small:

* :class:`CenteredSoftplus` ``s0(x; β) = log((1 + e^{βx}) / 2) / β``: a softplus shifted so
  that ``s0(0) = 0``; 1-Lipschitz, curvature at most ``β/4``, tends to ReLU as ``β → ∞``.
* :class:`SpectralLinear` / :class:`SpectralConv2d`: the weight divided by the operator 2-norm
  σ of the layer's linear map (for a convolution: of the convolution on the layer's input
  shape, not of the reshaped kernel), estimated by power iteration, so each is 1-Lipschitz.
* :class:`LipschitzBatchNorm2d` (the paper's "γ-Lipschitz BatchNorm"): BatchNorm whose
  largest per-channel gain is clipped to γ, so the layer is at most γ-Lipschitz.

Choices, checked against the slides and the authors' code (github.com/kylematoba/lcnn):

* Spectral normalisation divides by σ itself (``W/σ``, Miyato et al.), not by ``max(1, σ)``:
  the slides say linear layers "are re-parameterized by dividing by their spectral norm,
  ensuring that the overall spectral norm of the parameterized layer is 1", and the authors'
  convolution code returns ``weight / σ``. Every normalised layer has Lipschitz constant 1
  (up to the power-iteration error), whatever the scale of its raw weight.
* β and γ: the authors' LCNN makes both trainable (β initialised at 5, γ at 10) and adds
  ``λ_β Σβ + λ_γ Σ|log γ|`` to the loss. :data:`LCNN_DEFAULTS` holds those values; the
  layers keep them fixed unless built with ``trainable=True`` (log-parameterised, as there).
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError

#: The paper's LCNN: centered softplus with β = 5 and γ-Lipschitz BatchNorm with γ = 10 (the
#: initial values of the authors' trainable β and γ), spectral-normalised convs and linears.
LCNN_DEFAULTS = MappingProxyType(
    {"activation": "centered_softplus", "beta": 5.0, "spectral_norm": True, "bn_gamma": 10.0}
)
ACTIVATIONS = ("relu", "centered_softplus")


def lcnn_options(beta: Optional[float] = None, bn_gamma: Optional[float] = None) -> dict:
    """The LCNN paper's network as model options (``--lcnn``, a sweep variant's ``lcnn: true``,
    ``lcnn=True``): centered softplus, spectral norm, γ-Lipschitz BatchNorm, with ``LCNN_DEFAULTS``'
    β and γ unless given."""
    return {"activation": LCNN_DEFAULTS["activation"], "spectral_norm": True,
            "beta": LCNN_DEFAULTS["beta"] if beta is None else beta,
            "bn_gamma": LCNN_DEFAULTS["bn_gamma"] if bn_gamma is None else bn_gamma}


class CenteredSoftplus(nn.Module):
    """The paper's centered softplus (eq. in §3.3): ``s0(x; β) = log((1 + e^{βx}) / 2) / β
    = softplus(x; β) − log(2)/β``, elementwise, any shape.

    ``s0(0) = 0``, ``0 < s0' < 1`` (1-Lipschitz), ``s0'' ≤ β/4``, and
    ``|s0(x; β) − relu(x)| ≤ log(2)/β``. Computed with ``F.softplus``, which switches to
    the linear branch for ``βx > 20``: no overflow for any finite x. ``trainable=True`` makes
    β a parameter (stored as ``log_beta``, so it stays positive), as in the authors' code.
    """

    def __init__(self, beta: float = LCNN_DEFAULTS["beta"], trainable: bool = False):
        super().__init__()
        _check_positive("beta", beta)
        self.trainable = trainable
        if trainable:
            self.log_beta = nn.Parameter(torch.tensor(math.log(beta)))
        else:
            self._beta = float(beta)

    @property
    def beta(self) -> torch.Tensor | float:
        """β: a 0-d tensor (differentiable) when trainable, else a float."""
        return self.log_beta.exp() if self.trainable else self._beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trainable:
            return F.softplus(x, beta=self._beta) - math.log(2.0) / self._beta
        beta = self.log_beta.exp()
        return (F.softplus(beta * x) - math.log(2.0)) / beta

    def extra_repr(self) -> str:
        return f"beta={float(self.beta):g}, trainable={self.trainable}"


# --------------------------------------------------------------------------------------
# Spectral normalisation
# --------------------------------------------------------------------------------------


def _normalize(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return t / t.norm().clamp_min(eps)


def _lanczos_top(op: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int) -> torch.Tensor:
    """Unit top eigenvector estimate (Ritz vector) of the symmetric PSD operator ``op`` after
    ``steps`` Lanczos steps from ``v0``, with full reorthogonalisation (memory: ``steps``
    copies of v0).

    Why not plain power iteration: a convolution's top singular values are nearly degenerate
    (neighbouring frequencies), where power iteration converges like O(1/k), Lanczos like
    O(1/k²). Measured on randomly initialised 3x3 convs (1->32 on 28x28, 64->128 stride 2 on
    16x16): 100 power steps leave σ 2-3e-3 too low, 32 Lanczos steps 4e-6 and 5e-5; the
    worst case seen with 32 steps is 4.5e-4 (512->512 on 4x4). The Ritz value never exceeds
    the top eigenvalue, so the estimate errs low, and power iteration from the Ritz vector
    can only raise it.
    """
    q = _normalize(v0).flatten()
    basis, alphas, betas, scale = [q], [], [], 0.0
    for _ in range(steps):
        w = op(q.view_as(v0)).flatten()
        alphas.append(torch.dot(q, w))
        scale = max(scale, float(alphas[-1]))
        Q = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - Q.t() @ (Q @ w)
        beta = w.norm()
        if float(beta) <= 1e-6 * scale:
            break  # an invariant subspace: the Ritz values are exact
        betas.append(beta)
        q = w / beta
        basis.append(q)
    k = len(alphas)
    T = torch.diag(torch.stack(alphas))
    if k > 1:
        off = torch.stack(betas[: k - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    _, vecs = torch.linalg.eigh(T)
    return _normalize((torch.stack(basis[:k]).t() @ vecs[:, -1]).view_as(v0))


class _SpectralNorm(nn.Module):
    """Shared power-iteration state for a linear map ``A`` (the layer without its bias).

    Buffers ``u`` (output-shaped) and ``v`` (input-shaped) hold the estimated top left and
    right singular vectors; σ = ``⟨u, A v⟩`` with u, v held constant, so the gradient flows
    through W (Miyato et al. 2018). They are initialised at the layer's first forward (in
    either mode, on whatever device the layer then lives) by ``init_steps`` Lanczos steps from
    a fixed-seed random vector: deterministic, identical on every data-parallel worker, and
    the global RNG is left alone. Each training-mode forward then runs ``n_power_iterations``
    steps ``v ← Aᵀu/‖Aᵀu‖, u ← Av/‖Av‖`` to follow W as it trains; an eval-mode forward
    uses the stored u, v without updating them (σ is still recomputed from the current W:
    exact to first order in the change of W since the last update).

    Both estimates can only err low, so σ is divided by ``1 - margin``: the layer's Lipschitz
    constant stays ≤ 1 unless the estimate is off by more than the margin. The default margin
    1e-3 covers the worst error measured after initialisation (4.5e-4, a 512->512 3x3 conv
    on 4x4 inputs; typically < 1e-4) and shrinks the layer by only 0.1%. Runs in float32
    (float64 for a float64 model), also under autocast.
    """

    weight: nn.Parameter
    u: torch.Tensor
    v: torch.Tensor

    def _setup(self, n_power_iterations: int, init_steps: int, margin: float) -> None:
        if n_power_iterations < 0 or init_steps < 1 or not 0 <= margin < 0.5:
            raise ValueError("need n_power_iterations >= 0, init_steps >= 1, 0 <= margin < 0.5")
        self.n_power_iterations = n_power_iterations
        self.init_steps = init_steps
        self.margin = margin
        self.register_buffer("u", torch.empty(0))
        self.register_buffer("v", torch.empty(0))
        self._needs_init = True    # u, v hold no estimate yet
        self._defer_init = False   # set by size_spectral_vectors: a shape-only forward

    def _apply_map(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # A v
        raise NotImplementedError

    def _apply_adjoint(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # Aᵀ u
        raise NotImplementedError

    def _work_weight(self) -> torch.Tensor:
        # float32 (also for half-precision weights), float64 for a float64 model
        return self.weight.to(torch.float64 if self.weight.dtype == torch.float64 else torch.float32)

    def _allocate(self, in_shape: Tuple[int, ...]) -> None:
        """Zero u, v for inputs of ``in_shape`` (one sample, e.g. ``(1, C, H, W)``)."""
        with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
            self.v = torch.zeros(in_shape, device=self.weight.device, dtype=self.weight.dtype)
            self.u = torch.zeros_like(self._apply_map(self.v, self.weight))
        self._needs_init = True

    @torch.no_grad()
    def _init_vectors(self) -> None:
        with torch.autocast(self.weight.device.type, enabled=False):
            w = self._work_weight().detach()
            gen = torch.Generator().manual_seed(0)
            v0 = torch.randn(self.v.shape, generator=gen, dtype=w.dtype).to(w.device)
            v = _lanczos_top(lambda t: self._apply_adjoint(self._apply_map(t, w), w), v0, self.init_steps)
            self.v.copy_(v)
            self.u.copy_(_normalize(self._apply_map(v, w)))
        self._needs_init = False

    @torch.no_grad()
    def _power_iterate(self, n: int) -> None:
        with torch.autocast(self.weight.device.type, enabled=False):
            w = self._work_weight().detach()
            u, v = self.u.to(w.dtype), self.v.to(w.dtype)
            for _ in range(n):
                v = _normalize(self._apply_adjoint(u, w))
                u = _normalize(self._apply_map(v, w))
            self.u.copy_(u)
            self.v.copy_(v)

    def sigma(self) -> torch.Tensor:
        """The current estimate of σ(A) divided by ``1 - margin``: a 0-d tensor,
        differentiable w.r.t. the weight. Updates nothing (call after a first forward)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            w = self._work_weight()
            # copies: a later in-place update of the buffers must not touch this graph
            u, v = self.u.to(w.dtype, copy=True), self.v.to(w.dtype, copy=True)
            s = (u * self._apply_map(v, w)).sum()
        return s / (1.0 - self.margin)

    def normalized_weight(self) -> torch.Tensor:
        """``W / σ``, after initialising u, v (first call) or power-iterating (training mode)."""
        if self._defer_init:
            return self.weight
        if self._needs_init:
            self._init_vectors()
        elif self.training and self.n_power_iterations:
            self._power_iterate(self.n_power_iterations)
        return self.weight / self.sigma().clamp_min(1e-12).to(self.weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # take the saved vectors' shapes (a conv sizes them at its first input), and their
        # estimate: a loaded layer does not re-initialise
        for name in ("u", "v"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        saved = state_dict.get(prefix + "u")
        if saved is not None and saved.numel() and bool(saved.abs().sum() > 0):
            self._needs_init = False


class SpectralLinear(_SpectralNorm):
    """``y = (W/σ(W)) x + b``, ``x [..., in_features] -> [..., out_features]``; σ(W) is the
    largest singular value of W, so the layer is 1-Lipschitz in l2 (see ``_SpectralNorm``).

    Same parameters, names and initialisation as ``nn.Linear``, plus buffers ``u [out]`` and
    ``v [in]``. Deliberately not an ``nn.Linear`` subclass: code with per-layer rules for
    ``nn.Linear`` (the book-keeping per-sample gradients of ``engine.scores.pergrad``) must not
    mistake it for a plain linear layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 n_power_iterations: int = 1, init_steps: int = 32, margin: float = 1e-3):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        ref = nn.Linear(in_features, out_features, bias)  # nn.Linear's init: the same RNG draws
        self.weight, self.bias = ref.weight, ref.bias
        self._setup(n_power_iterations, init_steps, margin)
        self._allocate((in_features,))

    def _apply_map(self, v, w):
        return w @ v

    def _apply_adjoint(self, u, w):
        return w.t() @ u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class SpectralConv2d(_SpectralNorm):
    """``y = conv2d(x, W/σ) + b``, ``x [B, C_in, H, W] -> [B, C_out, H', W']``, where σ is the
    operator 2-norm of the convolution *as a linear map on inputs of shape [C_in, H, W]*
    (zero padding, this stride and dilation), so the layer is 1-Lipschitz in l2. This is not
    the norm of the reshaped kernel matrix, which can be off by up to a factor sqrt(kh·kw).

    A is ``conv2d``, Aᵀ ``conv_transpose2d`` with the output padding that restores [H, W].
    ``u [1, C_out, H', W']`` and ``v [1, C_in, H, W]`` are sized by the first input (the
    model factories size them at build time, see :func:`size_spectral_vectors`) and sized and
    initialised afresh if an input of another spatial size arrives: σ depends on the input
    size. Same parameters, names and initialisation as ``nn.Conv2d`` (groups=1, zero padding);
    not an ``nn.Conv2d`` subclass (see :class:`SpectralLinear`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, *, n_power_iterations: int = 1,
                 init_steps: int = 32, margin: float = 1e-3):
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)
        if isinstance(ref.padding, str):
            raise ValueError("SpectralConv2d needs numeric padding")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = ref.kernel_size, ref.stride, ref.padding, ref.dilation
        self.weight, self.bias = ref.weight, ref.bias
        self._setup(n_power_iterations, init_steps, margin)

    def _apply_map(self, v, w):
        return F.conv2d(v, w, None, self.stride, self.padding, self.dilation)

    def _apply_adjoint(self, u, w):
        H, W = self.v.shape[-2:]
        pad = [size - ((n - 1) * s - 2 * p + d * (k - 1) + 1) for size, n, s, p, d, k in zip(
            (H, W), u.shape[-2:], self.stride, self.padding, self.dilation, self.kernel_size)]
        return F.conv_transpose2d(u, w, None, self.stride, self.padding, tuple(pad), 1, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v.dim() != 4 or self.v.shape[1:] != x.shape[1:]:
            self._allocate((1,) + tuple(x.shape[1:]))
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
                f"input={tuple(self.v.shape[1:]) if self.v.dim() == 4 else None}")


def size_spectral_vectors(model: nn.Module, input_shape: Tuple[int, ...]) -> nn.Module:
    """Size every :class:`SpectralConv2d`'s u, v for inputs ``[C, H, W]`` of ``model`` by one
    shape-only forward of a zero image (eval mode, no normalisation, nothing else changes).

    Done at build time so the buffers exist before data-parallel wrapping and a fresh model
    can load a checkpoint; the Lanczos initialisation itself waits for the first real
    forward, on the training device."""
    layers = [m for m in model.modules() if isinstance(m, _SpectralNorm)]
    if not any(isinstance(m, SpectralConv2d) for m in layers):
        return model
    was_training = model.training
    for m in layers:
        m._defer_init = True
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1,) + tuple(input_shape)))
    finally:
        for m in layers:
            m._defer_init = False
        model.train(was_training)
    return model


# --------------------------------------------------------------------------------------
# γ-Lipschitz BatchNorm
# --------------------------------------------------------------------------------------


class LipschitzBatchNorm2d(nn.Module):
    """The paper's γ-Lipschitz BatchNorm over ``[B, C, H, W]``.

    In eval mode BatchNorm is the per-channel affine map ``x -> g_c (x - μ_c) + b_c`` with gain
    ``g_c = w_c / sqrt(running_var_c + eps)``, whose Lipschitz constant is ``L = max_c |g_c|``.
    This layer multiplies the weight by one factor ``min(1, γ / L)``, so every gain, and hence
    the layer's Lipschitz constant, is at most γ. As in the authors' code the factor is one
    scalar for all channels (the channels keep their relative gains; it is not a per-channel
    clamp), computed from the *running* variance, and it is applied in both modes:

    * eval mode: exactly γ-Lipschitz (``gains()`` gives the per-channel gains);
    * train mode: the batch is normalised with its own statistics, as BatchNorm does, and the
      running statistics are updated; the weight is scaled by the same factor from the
      running variance (no gradient flows through the statistics, one does through ``w``).

    Parameters and buffers have BatchNorm2d's names (weight, bias, running_mean, running_var,
    num_batches_tracked); ``trainable=True`` adds ``log_gamma`` (γ learnt, as in the paper).
    Not an ``nn.BatchNorm2d`` subclass, so code with BatchNorm-specific rules
    (``engine.scores.pergrad``, ``SyncBatchNorm.convert_sync_batchnorm``) leaves it alone.
    """

    def __init__(self, num_features: int, gamma: float = LCNN_DEFAULTS["bn_gamma"], eps: float = 1e-5,
                 momentum: float = 0.1, trainable: bool = False):
        super().__init__()
        _check_positive("bn_gamma", gamma)
        self.num_features, self.eps, self.momentum, self.trainable = num_features, eps, momentum, trainable
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if trainable:
            self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma)))
        else:
            self._gamma = float(gamma)

    @property
    def gamma(self) -> torch.Tensor | float:
        """γ: a 0-d tensor (differentiable) when trainable, else a float."""
        return self.log_gamma.exp() if self.trainable else self._gamma

    def clip_factor(self) -> torch.Tensor:
        """``min(1, γ / max_c |w_c| / sqrt(running_var_c + eps))``, a 0-d tensor."""
        gain = self.weight.abs() / torch.sqrt(self.running_var + self.eps)
        return torch.clamp(self.gamma / gain.max().clamp_min(1e-12), max=1.0)

    def gains(self) -> torch.Tensor:
        """Per-channel eval-mode gains after clipping, ``[C]``; ``|gains| ≤ γ``."""
        return self.weight * self.clip_factor() / torch.sqrt(self.running_var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-d input [B, C, H, W], got shape {tuple(x.shape)}")
        weight = self.weight * self.clip_factor()  # from the running variance, before this update
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, self.bias,
                            self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, gamma={float(self.gamma):g}, eps={self.eps}, "
                f"momentum={self.momentum}, trainable={self.trainable}")


# --------------------------------------------------------------------------------------
# Model options
# --------------------------------------------------------------------------------------


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"model option {name} must be a positive finite number, got {value!r}")


class LayerOptions:
    """The LCNN model options, validated, and the layer constructors they imply.

    With the defaults every constructor returns the plain torch module (``nn.Conv2d``,
    ``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.Linear``), built with the same arguments and in the
    same order as before the options existed, so default models are unchanged bit for bit.
    """

    def __init__(self, activation: Optional[str] = None, beta: Optional[float] = None,
                 spectral_norm: Optional[bool] = None, bn_gamma: Optional[float] = None,
                 trainable_beta_gamma: bool = False, lcnn: bool = False):
        if not isinstance(lcnn, bool):
            raise ConfigError(f"model option lcnn must be true or false, got {lcnn!r}")
        if lcnn:
            if activation not in (None, LCNN_DEFAULTS["activation"]):
                raise ConfigError(f"model option lcnn=True uses activation='centered_softplus', got {activation!r}")
            if spectral_norm is False:
                raise ConfigError("model option lcnn=True uses spectral_norm=True, got False")
            paper = lcnn_options(beta, bn_gamma)
            activation, beta, spectral_norm, bn_gamma = (paper["activation"], paper["beta"], paper["spectral_norm"],
                                                         paper["bn_gamma"])
        activation = "relu" if activation is None else activation
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model option activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        if beta is not None:
            _check_positive("beta", beta)
            if activation != "centered_softplus":
                raise ConfigError(f"model option beta={beta!r} needs activation='centered_softplus' "
                                  f"(got activation={activation!r})")
        if spectral_norm is not None and not isinstance(spectral_norm, bool):
            raise ConfigError(f"model option spectral_norm must be true or false, got {spectral_norm!r}")
        if bn_gamma is not None:
            _check_positive("bn_gamma", bn_gamma)
        if not isinstance(trainable_beta_gamma, bool):
            raise ConfigError(f"model option trainable_beta_gamma must be true or false, got {trainable_beta_gamma!r}")
        if trainable_beta_gamma and activation == "relu" and bn_gamma is None:
            raise ConfigError("model option trainable_beta_gamma needs activation='centered_softplus' or bn_gamma")
        self.activation = activation
        self.beta = float(LCNN_DEFAULTS["beta"] if beta is None else beta)
        self.spectral_norm = bool(spectral_norm)
        self.bn_gamma = None if bn_gamma is None else float(bn_gamma)
        self.trainable = trainable_beta_gamma

    def conv(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
             bias: bool = False) -> nn.Module:
        if self.spectral_norm:
            return SpectralConv2d(cin, cout, kernel_size, stride, padding, bias=bias)
        return nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=bias)

    def linear(self, cin: int, cout: int) -> nn.Module:
        return SpectralLinear(cin, cout) if self.spectral_norm else nn.Linear(cin, cout)

    def bn(self, c: int) -> nn.Module:
        if self.bn_gamma is None:
            return nn.BatchNorm2d(c)
        return LipschitzBatchNorm2d(c, self.bn_gamma, trainable=self.trainable)

    def act(self, inplace: bool = False) -> nn.Module:
        if self.activation == "centered_softplus":
            return CenteredSoftplus(self.beta, trainable=self.trainable)
        return nn.ReLU(inplace=inplace)

    def finish(self, model: nn.Module, in_channels: int, image_size: int) -> nn.Module:
        """Size the spectral convolutions' vectors for ``[in_channels, image_size, image_size]``
        inputs (see :func:`size_spectral_vectors`); a no-op without ``spectral_norm``."""
        return size_spectral_vectors(model, (in_channels, image_size, image_size)) if self.spectral_norm else model
