"""Scorers that are functions of a model and a batch: ``(model, x, y) -> float32[B]``."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.scores import SCORERS


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@SCORERS.register("el2n")
def el2n(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EL2N (Paul et al. 2021): ``||softmax(f(x)) - onehot(y)||_2`` per sample, float32 [B]."""
    with eval_mode(model), torch.no_grad():
        p = torch.softmax(model(x).float(), dim=1)
        onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
        return torch.linalg.vector_norm(p - onehot, dim=1).float()


@SCORERS.register("loss")
def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the model's prediction, float32 [B] (nats)."""
    with eval_mode(model), torch.no_grad():
        return F.cross_entropy(model(x).float(), y, reduction="none")
