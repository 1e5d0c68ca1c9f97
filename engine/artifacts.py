"""Parquet artifacts (score tables, manifests) with provenance in the file metadata.

Contracts (see design.md):
* ``scores.parquet``: ``sample_id`` int64 (unique), ``label`` int64, one float32 column per
  score plus ``<score>_std`` across seeds; metadata key ``winnow`` = JSON provenance.
* ``manifest.parquet``: ``sample_id`` int64, ``weight`` float64; metadata: selector,
  fraction, parameters and the score table's content hash.

Writes are atomic (temp name in the same directory, then rename): an interrupted job never
leaves a file that looks complete.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import DamagedFileError, DataError, RefusedFileError, WriteFailedError

META_KEY = b"winnow"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """The repository's HEAD commit, ``$WINNOW_GIT_SHA``, or "unknown" outside a checkout."""
    if os.environ.get("WINNOW_GIT_SHA"):
        return os.environ["WINNOW_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "-C", str(PACKAGE_ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Versions that decide whether a number can be reproduced (no timestamps: artifacts of
    the same inputs must be byte-identical)."""
    import torch

    from engine import __version__

    env = {"winnow": __version__, "git_sha": git_sha(), "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__, "pyarrow": pa.__version__}
    try:  # read from the package metadata: the pure core never imports Ray
        env["ray"] = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:  # pure-core use without ray installed
        pass
    return env


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteFailedError(f"cannot write {path}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shared run directories
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, a directory made read-only under the job: no .tmp left
        Path(tmp).unlink(missing_ok=True)
        raise WriteFailedError(f"cannot write {path} ({len(data) / 2**20:.1f} MiB): {e.strerror or e}; nothing "
                               f"was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: str | Path, obj: Any) -> None:
    """``torch.save`` of ``obj`` (tensors, numbers, strings, None and lists, tuples and dicts of
    them: what ``load_tensors`` accepts), written atomically."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(path: str | Path, what: str) -> Any:
    """Read a file written by ``save_tensors`` as data, never as code: torch's weights-only
    unpickler builds tensors and plain containers and refuses every other object, so a planted
    pickle (a ``__reduce__`` that calls ``os.system``, say) is refused without running.

    Raises ``RefusedFileError`` for such a file and ``DamagedFileError`` for a truncated or
    unreadable one; both name the file and say ``what`` it should have been."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise RefusedFileError(f"{path}: refused to load {what}: it holds objects other than tensors and plain "
                               f"values, so Winnow did not write it; nothing in it was run ({first}). "
                               f"Delete it, or rerun with --fresh, to start over") from None
    except Exception as e:  # any error: truncated zip, short read, bad header
        raise DamagedFileError(f"{path}: {what} is damaged or truncated ({type(e).__name__}: "
                               f"{str(e).strip()[:200]})") from None


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_table(path: str | Path, table: pa.Table, meta: dict) -> None:
    """Write ``table`` to Parquet with ``meta`` as JSON under the ``winnow`` metadata key."""
    meta_json = json.dumps(meta, sort_keys=True, default=_jsonable).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: meta_json})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_table(path: str | Path, what: str) -> Tuple[pa.Table, dict]:
    """Read a Parquet artifact; DataError naming the file if it is missing or not Parquet."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{what} {str(path)!r} is not a readable Parquet file ({exc})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    return table.replace_schema_metadata(None), meta


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, ``sha256:<hex>``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _require_columns(table: pa.Table, cols: list[str], what: str, path) -> None:
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise DataError(f"{what} {str(path)!r} lacks column(s) {missing}; it has {table.column_names}")


def _int_column(table: pa.Table, name: str, what: str, path, min_value: Optional[int] = None) -> np.ndarray:
    """An integer column without nulls (and >= ``min_value``) as int64; DataError naming the
    file otherwise (a float or string column is refused, never truncated or parsed)."""
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise DataError(f"{what} {str(path)!r}: column {name!r} must hold integers, got {col.type}")
    if col.null_count:
        raise DataError(f"{what} {str(path)!r}: column {name!r} has {col.null_count} null value(s)")
    values = col.to_numpy().astype(np.int64)
    if min_value is not None and len(values) and values.min() < min_value:
        raise DataError(f"{what} {str(path)!r}: column {name!r} holds {int(values.min())}; values must be "
                        f">= {min_value}")
    return values


def _unique_ids(ids: np.ndarray, what: str, path) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        raise DataError(f"{what} {str(path)!r} has {len(dup)} duplicate sample_id(s), e.g. {int(dup[0])}")


def read_scores(path: str | Path) -> Tuple[pa.Table, dict]:
    """Read and check a score table: sample_id and label present, ids unique. Rows come back
    sorted by sample_id so selectors see a deterministic order."""
    table, meta = read_table(path, "score table")
    _require_columns(table, ["sample_id", "label"], "score table", path)
    ids = _int_column(table, "sample_id", "score table", path)
    _int_column(table, "label", "score table", path, min_value=0)
    _unique_ids(ids, "score table", path)
    return table.take(np.argsort(ids, kind="stable")), meta


def score_seconds(meta: Optional[dict]) -> float:
    """What a score table cost to make (proxy training and scoring: ``seconds`` in its
    metadata; 0 for a table from before it was recorded)."""
    return float(sum(((meta or {}).get("seconds") or {}).values()))


def score_columns(table: pa.Table) -> list[str]:
    """Numeric score columns (everything except ids, labels and *_std)."""
    skip = {"sample_id", "label"}
    return [c for c in table.column_names
            if c not in skip and not c.endswith("_std") and pa.types.is_floating(table.schema.field(c).type)]


def write_manifest(path: str | Path, sample_id: np.ndarray, weight: np.ndarray, meta: dict) -> None:
    """Write a manifest; rows sorted by sample_id so equal selections give equal bytes."""
    order = np.argsort(sample_id, kind="stable")
    table = pa.table({"sample_id": pa.array(np.asarray(sample_id, np.int64)[order]),
                      "weight": pa.array(np.asarray(weight, np.float64)[order])})
    write_table(path, table, meta)


def read_manifest(path: str | Path) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Read and check a manifest: unique ids, finite non-negative weights with a positive sum."""
    table, meta = read_table(path, "manifest")
    _require_columns(table, ["sample_id", "weight"], "manifest", path)
    ids = _int_column(table, "sample_id", "manifest", path)
    col = table.column("weight")
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)) or col.null_count:
        raise DataError(f"manifest {str(path)!r}: column 'weight' must hold numbers without nulls, got {col.type}")
    weight = col.to_numpy().astype(np.float64)
    if len(ids) == 0:
        raise DataError(f"manifest {str(path)!r} selects no sample")
    _unique_ids(ids, "manifest", path)
    if not np.all(np.isfinite(weight)) or np.any(weight < 0) or weight.sum() <= 0:
        raise DataError(f"manifest {str(path)!r} has weights that are negative, NaN/inf or all zero")
    return ids, weight, meta
