"""Scorers that are functions of a model and a batch: ``(model, x, y) -> float32[B]``."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.params import Rule, at_least, positive
from engine.scores import scorer
from engine.units import L_INF_STEP


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; every submodule's own ``training`` flag is
    restored after (a module the caller froze in eval mode stays frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@scorer("el2n", bf16=True)
def el2n(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EL2N (Paul et al. 2021): ``||softmax(f(x)) - onehot(y)||_2`` per sample, float32 [B]."""
    with eval_mode(model), torch.no_grad():
        p = torch.softmax(model(x).float(), dim=1)
        onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
        return torch.linalg.vector_norm(p - onehot, dim=1).float()


@scorer("loss", bf16=True)
def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the model's prediction, float32 [B] (nats)."""
    with eval_mode(model), torch.no_grad():
        return F.cross_entropy(model(x).float(), y, reduction="none")


def _per_sample_ce_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of per-sample cross-entropies: in eval mode, its gradient with respect
    to x_b is sample b's own input gradient. Half-precision logits go to float32; float64 stays
    float64 (the exactness checks run in float64)."""
    logits = model(x)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, y, reduction="sum")


@scorer("grand", bf16=True)
def grand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GraNd (Paul et al. 2021): exact ``||∇_θ CE(f(x), y)||_2`` over all trainable parameters,
    per sample, float32 [B]. BatchNorm uses running statistics (eval mode), so each sample's
    gradient is its own. Per-layer norms from activations and output gradients (see
    ``engine.scores.pergrad``): one forward and one backward pass for the batch."""
    from engine.scores.pergrad import per_sample_grad_sq_norms

    with eval_mode(model), torch.enable_grad():
        return per_sample_grad_sq_norms(model, x, y).sqrt().float()


@scorer("gradnorm_init", bf16=True, fixed_epochs=(0,))
def gradnorm_init(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GraNd at initialisation, the input of GEDA (the thesis's G_{D_T}): the same number as
    ``grand``; ``jobs.score`` always takes it on the epoch-0 (untrained) proxies."""
    return grand(model, x, y)



def probs_and_features(model: nn.Module, x: torch.Tensor, who: str):
    """One eval-mode, no-grad forward pass: float32 softmax probabilities [B, C], the final
    nn.Linear layer's float32 input features [B, d] and whether that layer has a bias."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{who} needs a model whose output layer is nn.Linear")
    feats = {}
    handle = last[-1].register_forward_hook(lambda m, a, o: feats.__setitem__("h", a[0]))
    try:
        with eval_mode(model), torch.no_grad():
            p = torch.softmax(model(x).float(), dim=1)
    finally:
        handle.remove()
    return p, feats["h"].float().flatten(1), last[-1].bias is not None


@scorer("grand_last", bf16=True)
def grand_last(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The common last-layer approximation of GraNd: the gradient norm over the final Linear
    layer's weight and bias only, ``||p - onehot(y)||_2 · sqrt(||h||² + 1)`` with h the
    penultimate features. Registered under its own name; never substituted for ``grand``."""
    p, h, has_bias = probs_and_features(model, x, "grand_last")
    err = (p - F.one_hot(y, p.shape[1]).to(p.dtype)).pow(2).sum(1)
    h2 = h.pow(2).sum(1) + (1.0 if has_bias else 0.0)
    return (err * h2).sqrt()



@scorer("input_norm")
def input_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x||_2`` of the (normalised) model input: the sanity baseline that GraNd at
    initialisation is known to correlate with."""
    return torch.linalg.vector_norm(x.flatten(1).float(), dim=1)


@contextlib.contextmanager
def input_grad_mode(model: nn.Module, tf32: bool = False) -> Iterator[nn.Module]:
    """For the input-gradient scorers: eval mode, gradients enabled, every parameter's
    ``requires_grad`` switched off (the graph then holds no parameter edges and no parameter
    gradient is ever formed; each flag is restored after), and on CUDA the TensorFloat-32 switches
    of cuBLAS and cuDNN set to ``tf32`` for the block (restored after).

    TF32 rounds matmul / convolution operands to a 10-bit mantissa (about 5e-4 relative):
    acceptable for ``curvature``, whose step moves every input coordinate by 8/255 (expected
    error about 1e-2 relative to float64; not measured on a GPU here), fatal for the finite-difference
    HVPs of ``nc`` (an r = 1e-3 step changes each pixel by ~2e-5 relative, below TF32's
    resolution), which therefore run with TF32 off. On CPU the switch does nothing."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    cuda = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cuda[0].allow_tf32, cuda[1].allow_tf32)
    with eval_mode(model), torch.enable_grad():
        try:
            for p, _ in params:
                p.requires_grad_(False)
            cuda[0].allow_tf32 = cuda[1].allow_tf32 = tf32
            yield model
        finally:
            cuda[0].allow_tf32, cuda[1].allow_tf32 = saved
            for p, flag in params:
                p.requires_grad_(flag)


def _input_grad(model: nn.Module, x: torch.Tensor, fn, create_graph: bool = False) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(model, x), x, create_graph=create_graph)
    return g


def loss_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``∇_x CE(f(x_b), y_b)`` per sample [B, ...] (call in eval mode: samples independent);
    ``create_graph`` keeps its graph, so that a function of it back-propagates into the
    parameters (the SLo-Curves and GradReg regularisers)."""
    return _input_grad(model, x, lambda m, v: _per_sample_ce_sum(m, v, y), create_graph)


def curvature_difference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g0: torch.Tensor, s: torch.Tensor,
                         eps: float, create_graph: bool = False) -> torch.Tensor:
    """SLo-Curves' ``||∇_x L(x + h·v) − ∇_x L(x)||_2`` per sample, [B]: ``g0`` the clean input
    gradient, ``v = s / ||s||_2`` per sample (``s`` a sign or ±1 direction, a constant) and
    ``h = eps·sqrt(D)``, so each coordinate of a sign direction moves by ``eps`` (model input
    units). The one definition the ``curvature`` score and the ``CE + λ·Curv`` regulariser share;
    with ``create_graph`` it is differentiable in the parameters."""
    norm = torch.linalg.vector_norm(s.flatten(1), dim=1).clamp_min(1e-12).view(-1, *[1] * (s.dim() - 1))
    h = eps * g0[0].numel() ** 0.5
    g1 = loss_input_grad(model, x.detach() + h * s / norm, y, create_graph)
    return torch.linalg.vector_norm((g1 - g0).flatten(1), dim=1)


@scorer("curvature", params={
    "eps": ("per-coordinate step in the model's input units (jobs.score: 8/255 in pixel units, divided by the data's std)",
            positive()),
    "direction": ("sign (the paper's) or rademacher (random ±1 directions, averaged)",
                  Rule(choices=("sign", "rademacher"))),
    "draws": ("rademacher directions averaged", at_least(1)),
    "seed": ("seed of the rademacher directions", at_least(0)),
    "tf32": ("TensorFloat-32 convolutions and matmuls on CUDA", None)})
def curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = L_INF_STEP,
              direction: str = "sign", draws: int = 1, seed: int = 0, tf32: bool = True) -> torch.Tensor:
    """SLo-Curves input-loss curvature (Garg & Roy, CVPR 2023), float32 [B]:
    ``||∇_x L(x + h·v) − ∇_x L(x)||_2`` with ``v = sign(∇_x L(x)) / ||sign(∇_x L(x))||_2``.

    ``h = eps·sqrt(D)``, so every input coordinate moves by ``eps``: the per-pixel change of an
    L∞ adversarial step, as the paper chooses h. ``eps`` is in the model's input units;
    ``jobs.score`` passes ``(8/255)/std`` so that it is 8/255 in [0, 1] pixel units (the common
    L∞ budget). No division by h: the score is the paper's ``Curv``, not a Hessian estimate.
    ``direction="rademacher"`` averages the same difference over ``draws`` random ±1
    directions (Hutchinson-style, the paper's ablation), seeded by ``seed``.

    Cost: 1 + ``draws`` input-gradient passes (forward + backward to x only; parameters are
    frozen for the call, see ``input_grad_mode``). ``tf32`` (default on): CUDA convolutions and
    matmuls in TensorFloat-32 (cuDNN's own default for convolutions; expected about 1e-2
    relative against float64); ``tf32=False`` for IEEE float32 (1e-3, tested). No effect on CPU.
    """
    with input_grad_mode(model, tf32=tf32):
        g0 = loss_input_grad(model, x, y)
        if direction == "sign":
            dirs = [torch.sign(g0)]
        elif direction == "rademacher":
            gen = torch.Generator(device="cpu").manual_seed(seed)
            dirs = [(torch.randint(0, 2, g0.shape, generator=gen) * 2 - 1).to(g0) for _ in range(draws)]
        else:
            raise ValueError(f"curvature direction must be 'sign' or 'rademacher', got {direction!r}")
        total = torch.zeros(len(x), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                            device=x.device)
        for s in dirs:
            total = total + curvature_difference(model, x, y, g0, s, eps).to(total.dtype)
        return (total / len(dirs)).float()


def _target_logit_sum(y: torch.Tensor):
    """f(x) = the logit of the labelled class, summed over the batch (per-sample input
    gradients and Hessian-vector products stay independent in eval mode)."""
    return lambda m, v: m(v).float().gather(1, y.view(-1, 1)).sum()


def geometry(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iters: int = 10, hvp: str = "fd",
             fd_step: float = 1e-3, eps: float = 1e-6, seed: int = 0, tf32: bool = False) -> dict:
    """LCNN model geometry per sample (Srinivas et al., NeurIPS 2022), for ``f(x)`` the
    pre-softmax logit of the labelled class (the paper measures the network's logit; we use
    the true class's so that the number does not depend on the prediction):

    * ``grad_norm`` = ``||∇_x f(x)||_2``
    * ``hessian_norm`` = ``||∇²_x f(x)||_2``, the spectral norm, by ``iters`` power iterations
      on Hessian-vector products (start: ``_start_direction``);
    * ``nc`` = ``hessian_norm / (grad_norm + eps)``.

    ``hvp="fd"`` (default, faster: one gradient pass per iteration) uses the forward
    difference ``(∇f(x + r·v) − ∇f(x)) / r`` with ``r = fd_step`` in input units (v has unit
    norm); its error is O(r) (relative error about 1e-3 at the float32 default, below 1e-6
    with r = 1e-7 in float64). ``hvp="exact"`` uses double backward. Note that a
    ReLU network's exact Hessian is zero almost everywhere; finite differences see the kinks.
    Cost: 1 + ``iters`` input-gradient passes (``hvp="fd"``), parameters frozen for the call.
    ``tf32`` stays off by default: TensorFloat-32's 10-bit mantissa is coarser than the
    forward-difference step (see ``input_grad_mode``); no effect on CPU.
    Returns float32 [B] tensors.
    """
    f = _target_logit_sum(y)
    with input_grad_mode(model, tf32=tf32):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(model, x), x, create_graph=hvp == "exact")
        v = _start_direction(g.detach(), seed)
        hv_norm = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for _ in range(iters):
            if hvp == "exact":
                (hv,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)
            elif hvp == "fd":
                hv = (_input_grad(model, x.detach() + fd_step * v, f) - g.detach()) / fd_step
            else:
                raise ValueError(f"hvp must be 'fd' or 'exact', got {hvp!r}")
            n = _norm(hv)
            hv_norm = n.flatten()
            v = hv / n.clamp_min(1e-30)
        grad_norm = torch.linalg.vector_norm(g.detach().flatten(1), dim=1)
    return {"grad_norm": grad_norm.float(), "hessian_norm": hv_norm.detach().float(),
            "nc": (hv_norm.detach() / (grad_norm + eps)).float()}


# the parameters of geometry(), which nc, grad_norm and hessian_norm forward theirs to
GEOMETRY_PARAMS = {"iters": ("power iterations for the Hessian's spectral norm", at_least(1)),
                   "hvp": ("Hessian-vector products by forward differences (fd) or double backward (exact)",
                           Rule(choices=("fd", "exact"))),
                   "fd_step": ("forward-difference step in input units", positive()),
                   "eps": ("added to the gradient norm in the ratio", positive()),
                   "seed": ("seed of the power iteration's start", at_least(0)),
                   "tf32": ("TensorFloat-32 on CUDA", None)}


def _start_direction(g: torch.Tensor, seed: int) -> torch.Tensor:
    """Power-iteration start per sample: its gradient direction plus a small fixed random
    pattern (the same for every sample, drawn from ``seed``), so the result of a finite
    number of iterations depends only on the sample, never on its batch or position."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pattern = torch.randn(g.shape[1:], generator=gen).to(g).unsqueeze(0)
    gn = _norm(g)
    v = g / gn.clamp_min(1e-30) + 0.1 * pattern / _norm(pattern)
    return v / _norm(v)


def _norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *[1] * (t.dim() - 1))


@scorer("nc", params=GEOMETRY_PARAMS, params_of=geometry)
def nc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor:
    """LCNN normalized curvature ``||∇²f||_2 / (||∇f||_2 + eps)``; parameters of ``geometry``."""
    return geometry(model, x, y, **params)["nc"]


@scorer("grad_norm", params=GEOMETRY_PARAMS, params_of=geometry)
def grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor:
    """``||∇_x f(x)||_2`` for f the labelled class's logit (one input-gradient pass)."""
    return geometry(model, x, y, **{**params, "iters": 0})["grad_norm"]


@scorer("hessian_norm", params=GEOMETRY_PARAMS, params_of=geometry)
def hessian_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor:
    """``||∇²_x f(x)||_2`` by power iteration; parameters of ``geometry``."""
    return geometry(model, x, y, **params)["hessian_norm"]
