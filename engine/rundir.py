"""A run directory's life: created for a job's artifacts and removed again when the job fails
(except the resumable work it names), ``--fresh`` discarding that work, and the list of image
files a source left out. Used by the stages (engine.stages) and the jobs alike."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

from engine.errors import ConfigError, user_error
from engine.runlock import LOCK_NAME


@contextlib.contextmanager
def output_dir(path: str | Path, keep: Sequence[str] = ()) -> Iterator[Path]:
    """Create ``path`` for a run's artifacts; if the job fails and the directory did not exist
    before, remove it again (an existing one keeps what earlier runs left), except for the
    subdirectories named in ``keep`` (work that a rerun resumes from, e.g. ``_partial``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} exists and is not a directory")
    # a directory holding only this run's lock (engine.runlock) is as new as a missing one
    existed = path.exists() and any(child.name != LOCK_NAME for child in path.iterdir())
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException as exc:
        if not existed:
            kept = [k for k in keep if (path / k).is_dir() and any((path / k).iterdir())]
            for child in path.iterdir():
                if child.name not in kept and child.name != LOCK_NAME:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            if kept and not _input_error(exc):  # after bad input the one error line says it all
                from engine.console import stderr

                print(f"partial work kept in {', '.join(str(path / k) for k in kept)}; rerun the same command "
                      f"to resume", file=stderr())
            else:
                with contextlib.suppress(OSError):
                    path.rmdir()  # unless the lock is still in it: run_lock removes both when it lets go
        raise


def _input_error(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) a user error of the input (exit status 2)."""
    err = user_error(exc) if isinstance(exc, Exception) else None
    return err is not None and getattr(err, "exit_code", 2) == 2


def start_fresh(out: Path, checkpoint_storage: Optional[str] = None) -> None:
    """``--fresh``: remove ``out/_partial`` and, for jobs.train, the run's directory under
    ``checkpoint_storage`` (a shared path or a URI), saying what went."""
    gone = []
    partial = Path(out) / "_partial"
    if partial.exists():
        shutil.rmtree(partial)
        gone.append(str(partial))
    if checkpoint_storage:
        import pyarrow.fs as pafs

        from engine.distributed.train import checkpoint_root
        from engine.storage import _filesystem

        target = checkpoint_root(checkpoint_storage, out)
        fs, path = _filesystem(target if "://" in target else str(Path(target).resolve()))
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
            gone.append(target)
    print(f"--fresh: removed {', '.join(gone)}" if gone else "--fresh: nothing to discard", flush=True)


def report_skipped(source, out: Path) -> dict:
    """For a source that left files out (``--bad-images skip``): write ``out/skipped_images.tsv``
    (path, reason), say how many, and return the provenance fields."""
    skipped = list(getattr(source, "skipped", ()) or ())
    if getattr(source, "bad", None) != "skip":
        return {}
    if skipped:
        from engine.artifacts import atomic_write_bytes

        lines = "".join(f"{rel}\t{' '.join(why.split())}\n" for rel, why in skipped)
        atomic_write_bytes(Path(out) / "skipped_images.tsv", ("path\treason\n" + lines).encode())
        print(f"skipped {len(skipped)} image file(s) that do not decode (--bad-images skip): listed in "
              f"{Path(out) / 'skipped_images.tsv'}", flush=True)
    return {"bad_images": "skip", "skipped_images": len(skipped)}


__all__ = ["output_dir", "report_skipped", "start_fresh"]
