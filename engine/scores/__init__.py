"""Per-sample scorers.

Two kinds, two registries:

* ``SCORERS[name](model, x, y, **params) -> float32 tensor [B]``: functions of a trained (or
  freshly initialised) model and a batch; ``x`` is the normalised float batch [B, C, H, W],
  ``y`` int64 [B]. The model is put in eval mode for the call and its mode restored after, so
  no state is left changed; samples are scored independently (BatchNorm uses running stats).
  Registered with ``@scorer(name, bf16=..., fixed_epochs=..., params=...)``: the entry
  (a ``ScorerEntry``, callable like the function) says its parameters (default, help, range),
  whether it may run under bf16 autocast and the proxy epochs it is always taken at.
* ``HISTORY_SCORERS[name](correct) -> float32 [N]``: numpy functions of the proxy-training
  history ``correct`` (bool [E, N], whether sample n was classified correctly when it was
  presented in epoch e).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

from engine.errors import ConfigError
from engine.params import Param, check_kwargs, describe, summary
from engine.registry import Registry, import_submodules

SCORERS: Registry = Registry("scorer")
HISTORY_SCORERS: Registry = Registry("history scorer")


@dataclass(frozen=True)
class ScorerEntry:
    """What the registry knows of a model scorer; calling it calls the scorer."""

    name: str
    fn: Callable
    bf16: bool                                # may run under bf16 autocast (--precision bf16)
    fixed_epochs: Optional[Tuple[int, ...]]   # proxy epochs it is always taken at (None: --score-epochs)
    params: Tuple[Param, ...]                 # its keyword parameters (--score-params NAME.PARAM=VALUE)
    summary: str

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def scorer(name: str, *, bf16: bool = False, fixed_epochs: Optional[Tuple[int, ...]] = None,
           params: Optional[Dict[str, tuple]] = None, params_of: Optional[Callable] = None) -> Callable:
    """Decorator: register ``fn`` as model scorer ``name``. ``params``: ``{name: (help, rule)}``
    for each keyword-only parameter of ``fn`` (or of ``params_of``, the function ``fn`` forwards
    its keyword arguments to). ``bf16``: only for a score that survives bf16 autocast
    (tolerances in tests/test_scorers_exact.py)."""

    def deco(fn: Callable) -> Callable:
        described = describe(f"scorer {name!r}", params_of or fn, params)
        SCORERS.register(name)(ScorerEntry(name, fn, bf16, fixed_epochs, described, summary(fn)))
        return fn

    return deco

# each module registers its scorers on import (history, model_scores, any new file)
import_submodules(__name__, __path__)


def parse_score_names(text: str | Sequence[str]) -> list[str]:
    """Split ``"el2n,forgetting"`` and check every name; ConfigError lists the known ones."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--scores: give at least one score name")
    known = sorted(set(SCORERS.names()) | set(HISTORY_SCORERS.names()))
    for n in names:
        if n not in SCORERS and n not in HISTORY_SCORERS:
            raise ConfigError(f"unknown score {n!r}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--scores: duplicate score name in {names}")
    return names


def score_epochs_for(name: str, default_epochs: Sequence[int]) -> tuple:
    """Proxy epochs at which model score ``name`` is taken: its own fixed epochs (e.g.
    ``gradnorm_init`` at 0) or the job's ``--score-epochs``."""
    return tuple(SCORERS[name].fixed_epochs or default_epochs)


def data_defaults(name: str, std: Sequence[float] | float) -> dict:
    """Parameter defaults that depend on the data's normalisation: curvature's per-coordinate
    step is 8/255 in [0, 1] pixel units, i.e. ``engine.units.input_units(8/255, std)`` in the
    model's input units."""
    if name == "curvature":
        from engine.units import L_INF_STEP, input_units

        return {"eps": input_units(L_INF_STEP, std)}
    return {}


def check_params(params: dict) -> dict:
    """{score: {param: value}} -> the same with each value checked against the scorer's
    declared parameter: its name, its type (an integer where the default is one, a finite
    number for a float, true/false for a flag) and its range (the scorer's entry)."""
    if not isinstance(params, dict):
        raise ConfigError(f"score_params must be a mapping score -> {{param: value}}, got {params!r}")
    out = {}
    for name, kw in params.items():
        if name not in SCORERS:
            raise ConfigError(f"--score-params: {name!r} is not a model score; known: {', '.join(SCORERS.names())}")
        if not isinstance(kw, dict):
            raise ConfigError(f"--score-params: {name} takes a mapping param -> value, got {kw!r}")
        every = SCORERS[name].params
        out[name] = check_kwargs(f"--score-params: score {name!r}", f"--score-params {name}.", kw,
                                 {p.name: p.default for p in every}, {p.name: p.rule for p in every if p.rule})
    return out


PRECISIONS = ("float32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def runs_in_bf16(name: str, precision: str) -> bool:
    """Whether score ``name`` runs under bf16 autocast at ``precision``: only the scorers marked
    ``bf16`` in their entries (forward-pass and gradient-norm scores). Curvature and the normalized-curvature
    family take differences of nearby gradients, which bf16's 8-bit mantissa would swamp, so
    they always run in float32."""
    return precision == "bf16" and SCORERS[name].bf16


def score_plan(models: dict, x, y, plan: Sequence[tuple], params: dict | None = None,
               precision: str = "float32") -> dict:
    """Run a scoring plan on one batch and keep the scores where they were computed:
    ``plan`` lists ``(score name, model key)`` pairs, ``models`` maps keys to modules,
    ``params`` maps score names to keyword arguments, ``precision`` is "float32" or "bf16"
    (autocast for the scorers that allow it, see ``runs_in_bf16``). Returns
    {f"{name}@{key}": detached float32 tensor [B]} on ``x``'s device, so a caller scoring many
    mini-batches can concatenate on the device and copy to the host once."""
    import contextlib

    import torch

    params = params or {}
    out = {}
    for name, key in plan:
        ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16) if runs_in_bf16(name, precision)
               else contextlib.nullcontext())
        with ctx:
            score = SCORERS[name](models[key], x, y, **params.get(name, {}))
        out[f"{name}@{key}"] = score.detach().float()
    return out


def score_batch(models: dict, x, y, plan: Sequence[tuple], params: dict | None = None,
                precision: str = "float32") -> dict:
    """``score_plan`` with the scores copied to the host: {f"{name}@{key}": float32 numpy [B]}.
    The same scorer loop runs in unit tests and inside the Ray Data scoring actors (which call
    ``score_plan`` per mini-batch), so both paths give equal numbers."""
    return {k: v.cpu().numpy() for k, v in score_plan(models, x, y, plan, params, precision).items()}
