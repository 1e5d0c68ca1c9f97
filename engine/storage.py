"""Outputs to a local path or to a URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).

Jobs compute into a local directory and, for a URI, upload the finished tree at the end:

    with staged_output("s3://bucket/winnow/run1") as local:
        ...write artifacts under local...

The staging directory is a function of the URI (under ``$WINNOW_STAGING``, default
``~/.cache/winnow/staging``), so rerunning an interrupted job on the same node resumes from its
``_partial`` work as a local run would. Only a job that succeeded uploads; work-in-progress
directories (``_partial``) are not uploaded; the object ``_SUCCESS`` is written last, so a
reader can tell a complete upload from an interrupted one. Local paths pass through unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator

from engine.errors import ConfigError

URI = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
SKIP = {"_partial", ".winnow-lock"}  # work in progress; engine.runlock's lock file
SUCCESS = "_SUCCESS"


def is_uri(path: str | os.PathLike) -> bool:
    return bool(URI.match(str(path)))


def cache_root() -> Path:
    """Winnow's per-user cache: ``$WINNOW_CACHE``, default ``~/.cache/winnow`` (staging
    directories, the private Ray's token, image-decoding verdicts)."""
    return Path(os.environ.get("WINNOW_CACHE") or Path.home() / ".cache" / "winnow")


def staging_dir(uri: str) -> Path:
    root = Path(os.environ.get("WINNOW_STAGING") or cache_root() / "staging")
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    return root / f"{hashlib.sha256(uri.encode()).hexdigest()[:12]}-{tail}"


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # any error: unknown scheme, missing credentials, bad bucket
        raise ConfigError(f"--out {uri!r}: cannot open it as a filesystem URI ({str(e).splitlines()[0]})") from None


def upload_tree(local: Path, uri: str) -> int:
    """Copy the files under ``local`` (except ``_partial``) to ``uri``; ``_SUCCESS`` last.
    Returns the number of files copied."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    root = root.rstrip("/")
    try:
        fs.delete_file(f"{root}/{SUCCESS}")  # an earlier complete upload is being replaced
    except (FileNotFoundError, OSError):
        pass
    local_fs = pafs.LocalFileSystem()
    n = 0
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local)
        if path.is_dir() or rel.parts[0] in SKIP:
            continue
        dest = f"{root}/{rel.as_posix()}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(path), dest, source_filesystem=local_fs, destination_filesystem=fs)
        n += 1
    with fs.open_output_stream(f"{root}/{SUCCESS}") as f:
        f.write(f"{n} files\n".encode())
    return n


@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
    """Yield the local directory a job writes to; for a URI upload it after success."""
    if not is_uri(out):
        yield out
        return
    _filesystem(out)  # fail early on a malformed URI or unreachable store
    local = staging_dir(out)
    local.mkdir(parents=True, exist_ok=True)
    yield str(local)
    n = upload_tree(local, out)
    print(f"uploaded {n} file(s) to {out} ({SUCCESS} written last)")


@contextlib.contextmanager
def staged_file(out: str) -> Iterator[str]:
    """Like ``staged_output`` for a job whose output is one file (jobs.select's manifest)."""
    if not is_uri(out):
        yield out
        return
    parent, _, name = str(out).rstrip("/").rpartition("/")
    fs, root = _filesystem(parent + "/")
    local = staging_dir(out)
    local.mkdir(parents=True, exist_ok=True)
    yield str(local / name)
    import pyarrow.fs as pafs

    fs.create_dir(root.rstrip("/"), recursive=True)
    pafs.copy_files(str(local / name), f"{root.rstrip('/')}/{name}", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    print(f"uploaded {name} to {out}")
