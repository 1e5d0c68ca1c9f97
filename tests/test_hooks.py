"""engine.hooks: the points where tests and bench/ attach fault drills and telemetry."""
from __future__ import annotations

import sys
import types

import pytest

from engine import hooks
from engine.errors import ConfigError


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(hooks.ENV, raising=False)
    hooks.uninstall_all()
    yield
    hooks.uninstall_all()


def _module(monkeypatch, name: str, calls: list):
    mod = types.ModuleType(name)

    def install(on):
        calls.append("installed")
        on("train.checkpointed", lambda work_dir, epoch: calls.append((work_dir, epoch)))

    mod.install = install
    monkeypatch.setitem(sys.modules, name, mod)


def test_nothing_installed_is_a_no_op():
    hooks.fire("train.checkpointed", work_dir="/x", epoch=1)


def test_the_environment_installs_each_module_once_per_process(monkeypatch):
    calls = []
    _module(monkeypatch, "winnow_test_hook", calls)
    monkeypatch.setenv(hooks.ENV, "winnow_test_hook")
    hooks.fire("train.checkpointed", work_dir="/x", epoch=1)
    hooks.fire("train.checkpointed", work_dir="/x", epoch=2)
    monkeypatch.setenv(hooks.ENV, "winnow_test_hook, ")  # another value naming the same module
    hooks.fire("scoring.call", actor=None, batch=None)
    assert calls == ["installed", ("/x", 1), ("/x", 2)]


def test_a_module_that_cannot_be_installed_is_named(monkeypatch):
    monkeypatch.setenv(hooks.ENV, "no_such_winnow_module")
    with pytest.raises(ConfigError, match=r"\$WINNOW_HOOKS names 'no_such_winnow_module'"):
        hooks.fire("scoring.call", actor=None, batch=None)


def test_unknown_points_are_refused():
    with pytest.raises(ValueError, match="unknown hook point 'scoring.cal'"):
        hooks.on("scoring.cal", print)
