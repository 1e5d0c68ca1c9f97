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
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

from engine.errors import ConfigError

URI = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
SKIP = {"_partial", ".winnow-lock"}  # work in progress; engine.runlock's lock file
SUCCESS = "_SUCCESS"


def is_uri(path: str | os.PathLike) -> bool:
    return bool(URI.match(str(path)))


# the URI schemes pyarrow.fs opens (FileSystem.from_uri); anything else is a typo, refused early
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az")
MIN_FREE = 16 << 20  # an output directory's disk must have this much free besides what is known to be needed


def check_uri(value: str, what: str) -> None:
    """A URI's scheme is one Winnow can write to (no network access: credentials and buckets
    are checked when the store is opened)."""
    if is_uri(value):
        scheme = str(value).split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise ConfigError(f"{what} {str(value)!r}: unknown filesystem scheme '{scheme}://'; use a local path "
                              f"or one of {', '.join(s + '://' for s in SCHEMES)}")


def check_output(path: str | os.PathLike, what: str = "--out", *, file: bool = False,
                 inputs: Iterable[Optional[str]] = (), need_bytes: int = 0) -> None:
    """Before any work starts: the job can write its output ``path`` (a directory, or with
    ``file`` a file). It is none of the command's ``inputs``; the nearest existing directory on
    its way takes a new file (probed by creating and removing one, which is also right as root
    and on read-only mounts); its disk has ``need_bytes`` + 16 MiB free. URIs: the scheme only."""
    if is_uri(path):
        check_uri(str(path), what)
        return
    target = Path(path).expanduser().resolve()
    for given in inputs:
        if given and not is_uri(given) and Path(given).expanduser().resolve() == target:
            raise ConfigError(f"{what} {str(path)!r} is also an input of this command ({given}); writing there "
                              f"would destroy it: give another {what}")
    if file and target.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory; give the file's name")
    if not file and target.exists() and not target.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is not a directory")
    where = target.parent if file else target
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise ConfigError(f"{what} {str(path)!r}: {where} is a file, so nothing can be created below it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".winnow-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r}: cannot write in {where} ({e.strerror or e})") from None
    free = shutil.disk_usage(where).free
    if free < need_bytes + MIN_FREE:
        raise ConfigError(f"{what} {str(path)!r}: only {free / 2**20:.1f} MiB free on the disk of {where}; this "
                          f"output needs about {(need_bytes + MIN_FREE) / 2**20:.1f} MiB")


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
