"""The newcomer's documents stay true: their links resolve inside the repository, and the code in
CONTRIBUTING.md registers and runs as printed, as one new file per method."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

DOCS = ("README.md", "ARCHITECTURE.md", "CONTRIBUTING.md", "BENCHMARKS.md")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS)
def test_links_stay_inside_the_repository(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto: ...
            continue
        path = (ROOT / target).resolve()
        if ROOT not in path.parents and path != ROOT or not path.exists():
            bad.append(target)
    assert not bad, f"{doc} links to files outside the repository or missing: {bad}"


def _examples() -> dict:
    """{path: code} of the ``engine/.../my_*.py`` blocks in CONTRIBUTING.md."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    return dict(re.findall(r"`(engine/[a-z]+/my_[a-z_]+\.py)`:\n\n```python\n(.*?)```", text, re.S))


def test_contributing_examples_are_one_file_each(tmp_path):
    """Copy the repository's engine into a scratch directory, drop each runnable example in as its
    file (the data source is a skeleton with ``...``), import the packages and use the new
    methods. Nothing else is edited: the packages discover their modules."""
    examples = _examples()
    assert {p.split("/")[1] for p in examples} == {"scores", "select", "data", "models"}
    import shutil

    shutil.copytree(ROOT / "engine", tmp_path / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    for path, code in examples.items():
        if "..." not in code:
            (tmp_path / path).write_text(code)
    check = textwrap.dedent("""
        import numpy as np, torch
        from engine.models import build_model
        from engine.scores import SCORERS
        from engine.select import SELECTORS, total_quota
        model = build_model("mlp", 1, 10, 8)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 10
        s = SCORERS["margin"](build_model("small-cnn", 1, 10, 8), x, y)
        assert s.shape == (6,) and s.dtype == torch.float32
        labels = np.repeat(np.arange(3), 10)
        sel = SELECTORS["median"](np.arange(30.0), labels, 0.3, seed=0)
        assert len(sel.index) == total_quota(30, 0.3) == 9
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_import_submodules_imports_every_public_module_once(tmp_path):
    from engine.registry import import_submodules

    pkg = tmp_path / "plug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("SEEN = []\n")
    for name in ("b_mod", "a_mod", "_private", "skipped"):
        (pkg / f"{name}.py").write_text(f"from plug import SEEN\nSEEN.append({name!r})\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import plug

        import_submodules("plug", plug.__path__, skip=("skipped",))
        import_submodules("plug", plug.__path__, skip=("skipped",))  # a second call imports nothing again
        assert plug.SEEN == ["a_mod", "b_mod"]
    finally:
        sys.path.remove(str(tmp_path))
        for m in [m for m in sys.modules if m == "plug" or m.startswith("plug.")]:
            del sys.modules[m]
