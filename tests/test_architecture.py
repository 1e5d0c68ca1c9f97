"""Layout rules, checked on the source text (AST only: nothing heavy is imported, so this file
runs in well under a second).

* Ray is imported only under ``engine/distributed/`` (the thin Ray shell); the pure core and
  the jobs reach Ray through it, and read Ray's version through ``importlib.metadata``;
* only the runtime helper (``engine/distributed/runtime.py``) starts Ray: jobs and benchmarks
  call ``ray_session``, never ``ray.init``;
* files are data: ``torch.load`` is called only by ``engine.artifacts.load_tensors`` (weights
  only); no ``pickle`` / ``cloudpickle`` load, no ``yaml.load``, no ``allow_pickle=True``;
* production code carries no fault drill: no ``os._exit`` in ``engine/`` or ``jobs/`` (drills
  and benchmark telemetry attach through ``engine.hooks``, from ``tests/`` and ``bench/``);
* jobs are thin: no ``jobs/*.py`` imports another job (only the shared ``jobs._cli`` and ``jobs._train_flags``), each is
  at most 120 lines, and no function in ``engine/`` or ``jobs/`` is over 60 lines;
* ``ruff check .`` is clean (``make lint``; ``make test`` runs it first).

Every failure lists all offenders as ``path:line: what``.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY_HOME = "engine/distributed/"
RAY_STARTER = "engine/distributed/runtime.py"


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _py_files(*dirs: str, root: Path = ROOT) -> list[Path]:
    return sorted(p for d in dirs for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _package(path: Path, root: Path) -> list[str]:
    """The package a file's relative imports start from: ``engine/distributed/scoring.py`` ->
    ["engine", "distributed"]."""
    return list(path.relative_to(root).parts[:-1])


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, lazy ones in functions
    included, and of ``importlib.import_module("...")`` / ``__import__("...")`` with a literal;
    ``from a import b`` yields both ``a`` and ``a.b`` (b may be a module)."""
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package(path, root)
                module = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def _is_or_under(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def ray_imports_outside_home(root: Path = ROOT) -> list[str]:
    """``path:line: imports MODULE`` for every import of ray in engine/ or jobs/ outside
    engine/distributed/."""
    out = []
    for path in _py_files("engine", "jobs", root=root):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(RAY_HOME):
            continue
        seen = set()
        for line, module in _imports(path, root):
            if line not in seen and _is_or_under(module, "ray"):
                seen.add(line)
                out.append(f"{rel}:{line}: imports {module}")
    return out


def _ray_init_calls(path: Path) -> list[int]:
    """Lines that call ``ray.init(...)`` (also ``import ray as r; r.init``) or a bare ``init``
    imported from ray."""
    tree = _tree(path)
    ray_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names if a.name == "ray"} | {"ray"}
    init_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and n.module == "ray" for a in n.names if a.name == "init"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "init" and isinstance(f.value, ast.Name)
                    and f.value.id in ray_names) or (isinstance(f, ast.Name) and f.id in init_names):
                lines.append(node.lineno)
    return lines


def ray_starters(root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root).as_posix()}:{line}: calls ray.init "
            "(use engine.distributed.runtime.ray_session)"
            for path in _py_files("engine", "jobs", "bench", root=root)
            if path.relative_to(root).as_posix() != RAY_STARTER for line in _ray_init_calls(path)]


UNSAFE_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"),
                ("cloudpickle", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"), ("dill", "load"),
                ("dill", "loads"), ("joblib", "load")}
SAFE_LOADER = ("engine/artifacts.py", "load_tensors")


def unsafe_loads(root: Path = ROOT) -> list[str]:
    """``path:line: what`` for each call that could run code from a file: ``X.load(...)`` for the
    modules above (outside ``load_tensors``) and any call with ``allow_pickle=True``."""
    out = []
    for path in _py_files("engine", "jobs", "bench", root=root):
        rel = path.relative_to(root).as_posix()
        tree = _tree(path)
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and (rel, node.name) == SAFE_LOADER:
                allowed |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in allowed:
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in UNSAFE_CALLS:
                out.append(f"{rel}:{node.lineno}: {f.value.id}.{f.attr}(...)")
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                out.append(f"{rel}:{node.lineno}: allow_pickle")
    return out


JOB_LINES, FUNCTION_LINES = 120, 60
SHARED_JOB_MODULES = {"jobs", "jobs._cli", "jobs._train_flags"}  # shared flags and runner, not jobs


def jobs_importing_jobs(root: Path = ROOT) -> list[str]:
    """``path:line: imports MODULE`` for every import of another job by a job."""
    out = []
    for path in _py_files("jobs", root=root):
        rel, me = path.relative_to(root).as_posix(), f"jobs.{path.stem}"
        seen = set()
        for line, module in _imports(path, root):
            top = ".".join(module.split(".")[:2])
            if top.startswith("jobs.") and top not in SHARED_JOB_MODULES and top != me and line not in seen:
                seen.add(line)
                out.append(f"{rel}:{line}: imports {module}")
    return out


def hard_exits(root: Path = ROOT) -> list[str]:
    """``path:line: os._exit(...)`` in engine/ or jobs/."""
    return [f"{p.relative_to(root).as_posix()}:{n.lineno}: os._exit(...)" for p in _py_files("engine", "jobs", root=root)
            for n in ast.walk(_tree(p)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "_exit" and isinstance(n.func.value, ast.Name) and n.func.value.id == "os"]


def long_jobs(root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root).as_posix()}:1: {n} lines (at most {JOB_LINES})"
            for p in _py_files("jobs", root=root) if (n := len(p.read_text(encoding="utf-8").splitlines())) > JOB_LINES]


def long_functions(root: Path = ROOT) -> list[str]:
    out = []
    for path in _py_files("engine", "jobs", root=root):
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > FUNCTION_LINES:
                    out.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {node.name} is {n} lines")
    return out


def _fail_if(offenders: list[str], what: str) -> None:
    if offenders:
        pytest.fail(f"{what} ({len(offenders)}):\n  " + "\n  ".join(offenders), pytrace=False)


def test_ray_is_imported_only_in_engine_distributed():
    _fail_if(ray_imports_outside_home(), f"ray imported outside {RAY_HOME}")


def test_only_the_runtime_helper_starts_ray():
    _fail_if(ray_starters(), f"Ray started outside {RAY_STARTER}")


def test_files_are_loaded_as_data_only():
    _fail_if(unsafe_loads(), "calls that may run code from a file (use engine.artifacts.load_tensors)")


def test_jobs_are_thin():
    _fail_if(jobs_importing_jobs(), "jobs that import another job (share code through engine/, jobs/_cli.py or jobs/_train_flags.py)")
    _fail_if(long_jobs(), f"jobs over {JOB_LINES} lines (a job parses flags, calls one stage and prints)")
    _fail_if(long_functions(), f"functions over {FUNCTION_LINES} lines")


def test_no_fault_drill_in_production_code():
    _fail_if(hard_exits(), "hard exits in production code (a drill belongs in tests/drills.py, via engine.hooks)")


def test_the_thin_job_checks_catch_planted_violations(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(60))  # a function of 61 lines with its def
    short = "".join(f"    x{i} = {i}\n" for i in range(59))  # 60 lines: allowed
    files = {
        "jobs/__init__.py": "",
        "jobs/_cli.py": "import argparse\n",
        "jobs/a.py": "from jobs._cli import run\nfrom jobs.b import main\n",
        "jobs/b.py": "def main():\n    from jobs import c\n    import jobs.c.d\n" + "\n" * JOB_LINES,
        "jobs/c.py": f"def ok():\n{short}",
        "engine/e.py": f"def too_long():\n{body}",
        "engine/drill.py": "import os\ndef f():\n    os._exit(17)\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert jobs_importing_jobs(tmp_path) == ["jobs/a.py:2: imports jobs.b", "jobs/b.py:2: imports jobs.c",
                                             "jobs/b.py:3: imports jobs.c.d"]
    assert [o.split(": ")[0] for o in long_jobs(tmp_path)] == ["jobs/b.py:1"]
    assert long_functions(tmp_path) == ["engine/e.py:1: too_long is 61 lines"]
    assert hard_exits(tmp_path) == ["engine/drill.py:3: os._exit(...)"]


def test_the_checks_catch_planted_violations(tmp_path):
    """The two checks above on a planted tree: each kind of violation is found, the allowed
    places are not."""
    files = {
        "engine/__init__.py": "",
        "engine/core.py": "def f():\n    import ray.data\n",
        "engine/select/x.py": "from ray import tune\n",
        "engine/select/y.py": "import importlib\nm = importlib.import_module('ray')\n",
        "engine/select/z.py": "from .. import distributed\nimport rayon\n",  # not ray
        "engine/distributed/ok.py": "import ray\nray.init()\n",
        "engine/distributed/runtime.py": "import ray\nray.init()\n",
        "jobs/j.py": "from ray.train import Checkpoint\n",
        "bench/b.py": "import ray as r\nr.init(num_cpus=1)\n",
        "bench/c.py": "from ray import init\ninit()\n",
        "jobs/load.py": "import torch, pickle, numpy as np\ntorch.load('x')\npickle.loads(b'')\n"
                        "np.load('x', allow_pickle=True)\nnp.load('y')\n",
        "engine/artifacts.py": "def load_tensors(p):\n    return torch.load(p, weights_only=True)\n"
                               "def other(p):\n    return torch.load(p)\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert ray_imports_outside_home(tmp_path) == [
        "engine/core.py:2: imports ray.data", "engine/select/x.py:1: imports ray",
        "engine/select/y.py:2: imports ray", "jobs/j.py:1: imports ray.train"]
    assert [o.split(": ")[0] for o in ray_starters(tmp_path)] == [
        "bench/b.py:2", "bench/c.py:2", "engine/distributed/ok.py:2"]
    assert sorted(unsafe_loads(tmp_path)) == [
        "engine/artifacts.py:4: torch.load(...)", "jobs/load.py:2: torch.load(...)", "jobs/load.py:3: pickle.loads(...)",
        "jobs/load.py:4: allow_pickle"]


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    if shutil.which("ruff"):
        return [shutil.which("ruff")]
    pytest.fail("ruff is not installed: it is in the dev extra (make setup installs it)", pytrace=False)


def _ruff_check(*args: str):
    return subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "concise", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_ruff_is_clean():
    res = _ruff_check(".")
    assert res.returncode == 0, "ruff check . is not clean:\n" + (res.stdout + res.stderr)[-6000:]


def test_ruff_catches_planted_violations(tmp_path):
    """The project's ruff settings on a planted file: unused import, unsorted imports, undefined
    name, unused variable and a stale noqa are each reported."""
    bad = tmp_path / "planted.py"
    bad.write_text("import sys\nimport os\n\n\ndef f():\n    unused = 1\n    return undefined_name\n\n\n"
                   "x = 1  # noqa: F401\n")
    res = _ruff_check("--config", str(ROOT / "pyproject.toml"), str(bad))
    assert res.returncode == 1, res.stdout + res.stderr
    for code in ("F401", "I001", "F821", "F841", "RUF100"):
        assert code in res.stdout, f"{code} not reported:\n{res.stdout}"
