"""Training and evaluation loops over in-memory ``ArraySplit``s.

Everything here is deterministic on CPU for a given seed: the shuffling order comes from a
seeded ``torch.Generator`` and the initialisation from ``torch.manual_seed``.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import OptimConfig
from engine.data import ArraySplit, DataInfo, normalize
from engine.models import build_model


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's legacy global RNG and ``random`` (explicit seeds only)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def pick_device(gpus: float) -> torch.device:
    """CUDA when GPUs were asked for and one is visible, else CPU."""
    return torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")


def batch_to_input(images: np.ndarray | torch.Tensor, info: DataInfo, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, C] -> normalised float32 [B, C, H, W] on ``device`` (uint8 travels,
    the conversion happens on the device). Read-only arrays (Ray's zero-copy object-store
    views) are fine: the uint8 tensor is only read, ``normalize`` makes a new one."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.as_tensor(images)
    else:
        t = torch.as_tensor(images)
    return normalize(t.to(device, non_blocking=True), info.mean, info.std)


def make_optimizer(model: nn.Module, optim: OptimConfig, total_steps: int):
    """SGD with Nesterov momentum and a cosine schedule over ``total_steps`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                          nesterov=optim.momentum > 0, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))))
    return opt, sched


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Positions 0..n-1 in a random order fixed by (seed, epoch), cut into batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def order_key(sample_id: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """uint64 [N]: each sample's place in the (seed, epoch) order of a proxy's pass, a
    function of its id alone (splitmix64 of the id mixed with seed and epoch). Sorting by it
    gives the same order to rows held in memory and to rows streamed by Ray Data (sorted by
    this key), whatever order they were read in."""
    with np.errstate(over="ignore"):
        z = np.asarray(sample_id).astype(np.uint64) ^ np.uint64(
            ((int(seed) & 0xFFFFFFFF) << 32 | (int(epoch) & 0xFFFFFFFF)) * 0x9E3779B97F4A7C15 % 2**64)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            z = (z ^ (z >> np.uint64(shift))) * np.uint64(mult)
        return z ^ (z >> np.uint64(31))


def keyed_batches(sample_id: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Positions 0..N-1 in ``order_key`` order (ties by position), cut into batches."""
    perm = np.argsort(order_key(sample_id, seed, epoch), kind="stable")
    return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]


def weighted_batches(weight: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Weighted sampling: ``len(weight)`` positions drawn with replacement with probability
    proportional to ``weight``, in an order fixed by (seed, epoch), cut into batches. When all
    weights are equal this is exactly ``shuffled_batches`` (a permutation), so uniform
    weights reproduce unweighted training."""
    n = len(weight)
    w = np.asarray(weight, dtype=np.float64)
    if np.all(w == w[0]):
        return shuffled_batches(n, batch_size, seed, epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    draw = torch.multinomial(torch.as_tensor(w / w.sum()), n, replacement=True, generator=g).numpy()
    return [draw[i : i + batch_size] for i in range(0, n, batch_size)]


def epoch_plan(n: int, global_batch: int, epochs: int, budget: str, full_n: int) -> tuple[int, int]:
    """(passes over the subset, optimizer steps in all) for a training budget.

    ``budget="epochs"``: ``epochs`` passes over the subset of ``n`` samples (a subset of
    fraction f costs about f of the full run). ``budget="steps"``: as many optimizer steps as
    ``epochs`` passes over the full training split of ``full_n`` samples would take; the
    subset is passed over repeatedly and the last pass is cut short."""
    per_pass = math.ceil(n / global_batch)
    if budget == "epochs":
        return epochs, epochs * per_pass
    if budget == "steps":
        steps = epochs * math.ceil(full_n / global_batch)
        return math.ceil(steps / per_pass), steps
    raise ValueError(f"budget must be 'epochs' or 'steps', got {budget!r}")


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    split: ArraySplit,
    info: DataInfo,
    batches: Iterable[np.ndarray],
    device: torch.device,
    weight: Optional[np.ndarray] = None,
    penalty: Optional[Callable] = None,
    images: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    losses: Optional[torch.Tensor] = None,
) -> tuple[float, np.ndarray]:
    """One pass over ``batches`` (arrays of positions into ``split``).

    ``weight``: optional float [N] per-sample loss weights, normalised by the caller to mean 1
    over the training set, so the loss is ``mean_b(w_b * CE_b)`` and all-ones weights give
    exactly the unweighted loss.

    ``penalty``: optional ``(model, x, y) -> [B]`` per-sample regulariser (e.g.
    ``engine.train.regularizers.build_penalty``: λ·Curv + μ·GradReg), added to each sample's
    cross-entropy before weighting: the loss is ``mean_b(w_b * (CE_b + penalty_b))``. The
    reported loss is that total.

    ``split`` may hold torch tensors already on ``device`` (the GPU path of Ray Train keeps a
    small training set there) instead of numpy arrays.

    ``images``: optional ``positions -> uint8 [B, H, W, C]``, the training transform of this
    pass (``Source.augment`` for this epoch); default: ``split.image`` as stored.

    ``losses``: optional float64 [N] on ``device``: each visited sample's loss in its step
    (before its weight) is written at its position (InfoBatch's scores).

    Returns (mean loss over the pass, correct: bool [N] with each visited sample's
    correctness in its own minibatch, as forgetting scores need; unvisited stay False).
    """
    model.train()
    # accumulated on the device and read once at the end: no host sync per step
    correct = torch.zeros(len(split), dtype=torch.bool, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for idx in batches:
        x = batch_to_input(split.image[idx] if images is None else images(idx), info, device)
        y = torch.as_tensor(split.label[idx], device=device)
        w = None if weight is None else torch.as_tensor(weight[idx], device=device)
        keep = None if losses is None else _writer(losses, torch.as_tensor(idx, device=device))
        logits, loss = train_step(model, opt, sched, x, y, w, penalty, keep)
        correct[torch.as_tensor(idx, device=device)] = logits.argmax(1) == y
        total += loss * len(idx)
        count += len(idx)
    return float(total) / max(count, 1), correct.cpu().numpy()


def _writer(losses: torch.Tensor, at: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def write(values: torch.Tensor) -> None:
        losses[at] = values.double()

    return write


def train_step(model: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None,
               penalty: Optional[Callable] = None,
               keep: Optional[Callable[[torch.Tensor], None]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``mean_b(w_b · (CE_b + penalty_b))``; returns the detached logits
    and the float64 loss (both still on the device). ``keep``, if given, receives the
    detached per-sample ``CE_b + penalty_b``."""
    logits = model(x)
    ce = F.cross_entropy(logits, y, reduction="none")
    if penalty is not None:
        ce = ce + penalty(model, x, y)
    if keep is not None:
        keep(ce.detach())
    if w is not None:
        ce = ce * w.to(ce.dtype)
    loss = ce.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return logits.detach(), loss.detach().double()


def train_stream_epoch(model: nn.Module, opt, sched, batches: Iterable[dict], info: DataInfo, device: torch.device,
                       penalty: Optional[Callable] = None, max_steps: Optional[int] = None,
                       augment: Optional[Callable[[dict], np.ndarray]] = None) -> tuple[float, int, int]:
    """One pass over streamed dict batches ``{"image" uint8 [B, H, W, C], "label", "weight"}``
    (a Ray Data shard), at most ``max_steps`` steps; ``augment``: optional ``batch -> uint8
    images``, the training transform of this pass. Returns (mean loss, rows, steps)."""
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    rows = steps = 0
    for batch in batches:
        if max_steps is not None and steps >= max_steps:
            break
        x = batch_to_input(batch["image"] if augment is None else augment(batch), info, device)
        y = torch.as_tensor(batch["label"], device=device).long()
        w = torch.as_tensor(batch["weight"], device=device) if "weight" in batch else None
        _, loss = train_step(model, opt, sched, x, y, w, penalty)
        total += loss * len(y)
        rows += len(y)
        steps += 1
    return float(total) / max(rows, 1), rows, steps


@torch.no_grad()
def evaluate(model: nn.Module, split: ArraySplit, info: DataInfo, device: torch.device,
             batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (eval mode; previous mode restored), without
    autograd and in batches of ``batch_size``: memory fixed by the batch, whatever the test
    split's size (with autograd and 1,024-row batches, a 64 px test split of 2,000 images held
    0.6 GB more than one of 500: BENCHMARKS.md, issue 31)."""
    was_training = model.training
    model.eval()
    hits = 0
    with torch.no_grad():
        for b in split.batches(batch_size):
            logits = model(batch_to_input(b["image"], info, device))
            hits += int((logits.argmax(1).cpu() == torch.as_tensor(b["label"])).sum())
    model.train(was_training)
    return hits / max(len(split), 1)


@dataclass
class ProxyRun:
    """What one proxy training run leaves for scoring.

    states: {epoch: state_dict on CPU}; epoch 0 is the initialisation.
    correct: bool [E, N], correctness per epoch aligned with ``sample_id``.
    sample_id: int64 [N], the order of ``correct``'s columns.
    """

    seed: int
    states: Dict[int, Dict[str, torch.Tensor]]
    correct: np.ndarray
    sample_id: np.ndarray
    train_loss: list
    label: np.ndarray = None  # int64 [N], aligned with ``sample_id``

    def to_tensors(self) -> dict:
        """The run as tensors and plain values only (what ``artifacts.load_tensors`` reads)."""
        # torch.tensor copies: torch.save refuses tensors of different dtypes that share memory,
        # which empty numpy arrays (no proxy epochs yet) can do
        return {"seed": int(self.seed), "states": {int(e): dict(s) for e, s in self.states.items()},
                "correct": torch.tensor(np.asarray(self.correct, dtype=bool)),
                "sample_id": torch.tensor(np.asarray(self.sample_id, dtype=np.int64)),
                "train_loss": [float(x) for x in self.train_loss],
                "label": None if self.label is None else torch.tensor(np.asarray(self.label, dtype=np.int64))}

    @classmethod
    def from_tensors(cls, d: dict) -> "ProxyRun":
        """Inverse of ``to_tensors``; KeyError / TypeError / AttributeError on another layout."""
        return cls(seed=int(d["seed"]), states={int(e): dict(s) for e, s in d["states"].items()},
                   correct=d["correct"].numpy().astype(bool), sample_id=d["sample_id"].numpy().astype(np.int64),
                   train_loss=[float(x) for x in d["train_loss"]],
                   label=None if d["label"] is None else d["label"].numpy().astype(np.int64))


def fit_proxy(
    split: ArraySplit,
    info: DataInfo,
    model_name: str,
    optim: OptimConfig,
    epochs: int,
    seed: int,
    checkpoint_epochs: Iterable[int],
    device: torch.device,
    log: Callable[[str], None] = print,
    augment: Optional[Callable[[np.ndarray, int], np.ndarray]] = None,
) -> ProxyRun:
    """Train one proxy model from seed ``seed`` for ``epochs`` epochs on ``split``, keeping
    CPU copies of the weights at each epoch in ``checkpoint_epochs`` (0 = at init).
    ``augment``: optional ``(positions, epoch) -> uint8 images``, the training transform
    (``Source.augment``); the correctness history is taken on the augmented minibatches, as
    forgetting scores are in Toneva et al."""
    seed_everything(seed)
    model = build_model(model_name, info.image_shape[2], info.num_classes, info.image_shape[0]).to(device)
    steps = epochs * math.ceil(len(split) / optim.batch_size)
    opt, sched = make_optimizer(model, optim, steps)
    wanted = set(checkpoint_epochs)
    states = {0: _cpu_state(model)} if 0 in wanted else {}
    history, losses = [], []
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        batches = keyed_batches(split.sample_id, optim.batch_size, seed, epoch)
        images = None if augment is None else (lambda idx, e=epoch: augment(idx, e))
        loss, correct = train_epoch(model, opt, sched, split, info, batches, device, images=images)
        history.append(correct)
        losses.append(loss)
        log(f"proxy seed {seed}: epoch {epoch}/{epochs} loss {loss:.4f} train-acc {correct.mean():.3f} "
            f"({len(split)} rows in {time.time() - t0:.1f}s)")
        if epoch in wanted:
            states[epoch] = _cpu_state(model)
    return ProxyRun(seed, states, np.stack(history), split.sample_id.copy(), losses, split.label.copy())


def _cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
