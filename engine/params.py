"""Checks of a method's keyword parameters against what it declares, before any work starts.

A scorer or selector declares its parameters as keyword-only arguments with defaults; the
default's type is the parameter's type (``iters: int = 10`` takes integers only, ``eps: float``
finite numbers, ``hvp: str`` strings, ``tf32: bool`` true or false) and a ``Rule`` gives its
range or its choices. ``check_kwargs`` refuses, with one message naming the parameter, a value
of the wrong type, NaN or infinity, a value out of range and a name the method does not take.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from engine.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """Range of a numeric parameter (``lo``/``hi``, each bound open or closed) or the
    allowed values of a string one (``choices``)."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"

    def admits(self, v: Any) -> bool:
        if self.choices:
            return v in self.choices
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))


@dataclass(frozen=True)
class Param:
    """A method's keyword parameter as its registry entry describes it: the default (whose
    type is its type), what it does and its range or choices."""

    name: str
    default: Any
    help: str
    rule: Optional["Rule"] = None
    column: bool = False   # a selector parameter naming a score column ("" for none): the stage passes its values


def describe(owner: str, fn: Callable, given: Optional[Dict[str, tuple]], skip: Iterable[str] = ()) -> Tuple[Param, ...]:
    """``fn``'s keyword-only parameters (minus ``skip``) as ``Param``s, each described by
    ``given[name] = (help, rule or None[, column])``; a parameter without a description, or a
    description without a parameter, is a programming error (TypeError)."""
    given = dict(given or {})
    defaults = declared(fn, skip=skip)
    if set(given) != set(defaults):
        raise TypeError(f"{owner}: describe exactly its keyword parameters {sorted(defaults)}, got {sorted(given)}")
    out = tuple(Param(n, defaults[n], *given[n]) for n in sorted(given))
    for p in out:
        if p.column and p.default != "":
            raise TypeError(f"{owner}: column parameter {p.name} must default to '' (no column)")
    return out


def summary(fn: Callable) -> str:
    """The first paragraph of ``fn``'s docstring on one line."""
    return " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())


def positive() -> Rule:
    return Rule(lo=0, lo_open=True)


def at_least(lo: float) -> Rule:
    return Rule(lo=lo)


def declared(fn: Callable, skip: Iterable[str] = ()) -> Dict[str, Any]:
    """{name: default} of ``fn``'s keyword-only parameters with a default, minus ``skip``."""
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and n not in skip}


def check_value(what: str, value: Any, default: Any, rule: Optional[Rule] = None) -> Any:
    """``value`` checked against the type of ``default`` and ``rule``; returns it (an integer
    given for a float parameter comes back as a float)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{what} must be a finite number, got {value!r}")
        value = float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {value!r}")
    if rule is not None and not rule.admits(value):
        raise ConfigError(f"{what} must be {rule.describe()}, got {value!r}")
    return value


def check_kwargs(owner: str, prefix: str, params: dict, defaults: Dict[str, Any], rules: Dict[str, Rule]) -> dict:
    """Every entry of ``params`` is one of ``defaults``' names, of its type and in its rule's
    range; messages read ``<owner> has no parameter ...`` and ``<prefix><name> must be ...``.
    Returns the checked values."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"{owner} has no parameter {', '.join(map(repr, unknown))}; it has {sorted(defaults)}")
    return {k: check_value(f"{prefix}{k}", v, defaults[k], rules.get(k)) for k, v in params.items()}



def _pairs(text: str, form: str, ok) -> list:
    """A flag's comma-separated KEY=VALUE items as (key, parsed value); ``ok(key)`` says whether
    a key has the right ``form`` (argparse.ArgumentTypeError naming the item otherwise)."""
    import argparse

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        if not sep or not ok(key.strip()):
            raise argparse.ArgumentTypeError(f"expected {form}, got {item!r}")
        out.append((key.strip(), parse_value(value.strip())))
    return out


def parse_method_params(text: str) -> dict:
    """'nc.iters=20,curvature.eps=0.1' -> {"nc": {"iters": 20}, "curvature": {"eps": 0.1}}: a
    flag's METHOD.PARAM=VALUE list (argparse type; checked against the methods by ``check_kwargs``)."""
    out: dict = {}
    for key, value in _pairs(text, "SCORE.PARAM=VALUE", lambda k: all(k.partition(".")[::2]) and "." in k):
        score, _, name = key.partition(".")
        out.setdefault(score, {})[name] = value
    return out


def parse_params(text: str) -> dict:
    """'lam=0.5,tol=0.001' -> {"lam": 0.5, "tol": 0.001}: one method's NAME=VALUE list
    (argparse type; checked against the method by ``check_kwargs``)."""
    return dict(_pairs(text, "NAME=VALUE", bool))


def parse_value(text: str):
    """'20' -> 20, '0.1' -> 0.1, 'true'/'false' -> bool, anything else stays a string (the
    method's declared type decides whether it is welcome: ``check_kwargs``)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return text


__all__ = ["Param", "Rule", "at_least", "check_kwargs", "check_value", "declared", "describe", "parse_method_params",
           "parse_params", "parse_value", "positive", "summary"]
