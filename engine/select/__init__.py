"""Selectors: numpy in, positions (+ weights) out; no I/O, no torch, no ray.

A selector is a function ``fn(scores, labels, fraction, *, seed, **params) -> Selection``
registered with ``@selector(name, reads=..., params=...)``: its entry ``SELECTORS[name]`` (a
``SelectorEntry``, callable like the function) says what it reads (a score column and the
default one, gradient embeddings, or nothing), whether it weights samples and its parameters
(the keyword-only arguments: default, help, range). The jobs build their flags, help and
checks from the entries, so a selector is one file. ``scores`` is float64 [N] (or [N, d]
embeddings, or None for selectors that read nothing), ``labels`` int64 [N]; the returned
``Selection.index`` holds positions into those arrays. Callers sort the table by
``sample_id`` first, so positions map to ids deterministically and ties break towards the
smaller ``sample_id``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from engine.errors import ConfigError
from engine.params import Param, at_least, check_kwargs, describe, summary
from engine.registry import Registry, import_submodules

SELECTORS: Registry = Registry("selector")
READS = ("score", "embeddings", "nothing")


@dataclass(frozen=True)
class SelectorEntry:
    """What the registry knows of a selector; calling it calls the selector."""

    name: str
    fn: Callable
    reads: str                  # "score" (a column), "embeddings" (grad_embedding) or "nothing"
    column: Optional[str]       # the column read when none is given (None: the user names one)
    weights: bool               # whether the manifest's weights may differ from 1
    params: Tuple[Param, ...]   # its own parameters (besides seed)
    summary: str                # the docstring's first sentence

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


SEED = Param("seed", 0, "seed for random choices and tie-breaks", at_least(0))


def selector(name: str, *, reads: str = "score", column: Optional[str] = None, weights: bool = False,
             params: Optional[Dict[str, tuple]] = None) -> Callable:
    """Decorator: register ``fn`` as selector ``name``. ``params``: ``{name: (help, rule)}`` for
    each keyword-only parameter of ``fn`` besides ``seed`` (and ``mapper``, the class map the
    stage may hand over, and ``embeddings``, the [N, d] gradient embeddings a selector that reads
    a score may also take: online GEDA's weights); its default is the signature's."""
    if reads not in READS:
        raise ValueError(f"selector {name!r}: reads must be one of {READS}, got {reads!r}")

    def deco(fn: Callable) -> Callable:
        described = describe(f"selector {name!r}", fn, params, skip=("seed", "mapper", "embeddings"))
        SELECTORS.register(name)(SelectorEntry(name, fn, reads, column, weights, described, summary(fn)))
        return fn

    return deco


@dataclass
class Selection:
    """Result of a selector.

    index: int64 [k] positions into the selector's input arrays, sorted ascending.
    weight: float64 [k] per-sample training weights (all 1.0 unless the selector weights).
    info: JSON-serialisable details recorded in the manifest metadata (quotas, statuses...).
    """

    index: np.ndarray
    weight: np.ndarray
    info: dict = field(default_factory=dict)


from engine.select.quota import class_quotas, total_quota

# each module registers its selectors on import (basic, coreset, geda_selector, any new file)
import_submodules(__name__, __path__)



def parse_selection(text: str, allow_full: bool = False) -> Tuple[str, Optional[str]]:
    """``"topk:el2n"`` -> ("topk", "el2n"); ``"geda"`` -> ("geda", "gradnorm_init"), its entry's
    default column; ``"random"`` -> ("random", None); with ``allow_full``, ``"full"`` (the
    full-data baseline of a sweep) -> ("full", None). An unknown selector, or one that ranks by a
    column and has no default, is a ConfigError (before anything is scored)."""
    name, _, column = str(text).strip().partition(":")
    if allow_full and name == "full":
        return name, None
    entry = SELECTORS[name]  # unknown -> ConfigError listing the known ones
    if entry.reads == "nothing":
        return name, None
    column = column or entry.column
    if column is None:
        raise ConfigError(f"{name} ranks by a score column: write {name}:COLUMN, e.g. {name}:el2n")
    return name, column


def check_selector_params(name: str, params: dict) -> dict:
    """``params`` (seed included) checked against selector ``name``'s entry: names, types
    (``nodes: 2.5`` and ``lam: nan`` are refused) and ranges; before any score is read.
    Returns the checked values."""
    entry = SELECTORS[name]
    if not isinstance(params, dict):
        raise ConfigError(f"selector {name!r}: parameters must be a mapping name -> value, got {params!r}")
    every = (SEED, *entry.params)
    return check_kwargs(f"selector {name!r}", f"{name} parameter ", params, {p.name: p.default for p in every},
                        {p.name: p.rule for p in every if p.rule is not None})


__all__ = ["Param", "READS", "SELECTORS", "SEED", "SelectorEntry", "Selection", "check_selector_params",
           "class_quotas", "parse_selection", "total_quota", "selector"]
