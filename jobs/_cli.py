"""What every job shares: error handling, run directories, common flags.

A user error (``WinnowError``, also when raised inside a Ray task or actor) ends with one
line ``<job>: error: <message>`` on stderr and exit status 2 (1 for a ``RunFailedError``: the
cluster, not the input, failed); SIGINT or SIGTERM ends with one "interrupted; rerun the same
command to resume" line and exit status 130 or 143.
Either way no output file is left behind: artifacts are written atomically, and a run
directory this invocation created is removed again when the job fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

from engine.config import OptimConfig
from engine.errors import one_line, user_error
from engine.rundir import output_dir, report_skipped, start_fresh  # noqa: F401  (the jobs' helpers, re-exported)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds the job like Ctrl-C (every ``finally`` runs: Ray shut down,
    ``_partial`` kept, no half-written artifact), then exits 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list = []  # the signal that stopped the job, if one did


@contextlib.contextmanager
def _stop_cleanly_on_signals(job: str) -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread once; a second signal while
    the job is already stopping is reported and otherwise ignored, so the clean-up finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum, frame):
        if stopping:
            print(f"{job}: already stopping (cleaning up); SIGKILL to stop at once", file=sys.stderr, flush=True)
            return
        stopping.append(signum)
        _received[:] = [signum]  # Ray's C++ waits may turn the exception into a plain KeyboardInterrupt
        raise Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def run(job: str, main: Callable[[Sequence[str]], None], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` and turn user errors into exit status 2 with one message, and SIGINT /
    SIGTERM into one line and exit status 130 / 143."""
    try:
        with _stop_cleanly_on_signals(job):
            main(sys.argv[1:] if argv is None else list(argv))
        return 0
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else (_received[0] if _received else signal.SIGINT)
        print(f"{job}: interrupted ({signal.Signals(signum).name}); rerun the same command to resume (no finished "
              f"artifact was written)", file=sys.stderr, flush=True)
        return 128 + int(signum)
    except Exception as exc:  # any error: re-raised unless it is a user error
        err = user_error(exc)
        if err is None:
            raise
        where = _log_remote_traceback(job, exc, err)
        print(f"{job}: error: {one_line(err)}" + (f" (traceback: {where})" if where else ""), file=sys.stderr)
        return getattr(err, "exit_code", 2)


def _log_remote_traceback(job: str, exc: BaseException, err: BaseException) -> Optional[str]:
    """An error that came out of a Ray task, actor or worker: its whole chain of tracebacks
    (the remote one included) goes to ``~/.cache/winnow/logs/<job>-<time>-<pid>.log``, whose
    path the one console line names. The run directory cannot hold it: a failed job leaves no
    run directory it created. Errors raised in the driver need no log (the line says it all)."""
    import time
    import traceback

    if err is exc:
        return None
    try:
        from engine.storage import cache_root

        logs = cache_root() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text("".join(traceback.format_exception(exc)))
        return str(path)
    except OSError:
        return None


def entry(job: str, main: Callable[[Sequence[str]], None]) -> None:
    sys.exit(run(job, main))


FRESH_HELP = ("start over: discard the resumable work an earlier run of this --out left (OUT/_partial: proxies, "
              "score shards, Ray Train checkpoints, and the run's directory under --checkpoint-storage)")


def add_fresh_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fresh", action="store_true", help=FRESH_HELP)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    from engine.data.transforms import EVAL_TRANSFORMS

    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="images of any size (imagefolder, parquet of image files, webdataset) are brought to S x S: shorter side resized to S/0.875 "
                        "(to S at 64 px or less) and center-cropped, as torchvision's ImageNet reference does "
                        "(default: the first training image's shorter side, at most 224)")
    p.add_argument("--eval-transform", choices=EVAL_TRANSFORMS, default=None,
                   help="how images of any size (imagefolder, parquet, webdataset) are brought to S x S for scoring and evaluation: "
                        "center-crop (the default: shorter side to S/0.875, center crop S) or resize (shorter side "
                        "to S, center crop S)")
    p.add_argument("--bad-images", choices=("fail", "skip"), default=None,
                   help="an image that does not decode (imagefolder, parquet, webdataset): fail (the default: one line naming "
                        "it, exit 2, nothing written) or skip (left out; listed in OUT/skipped_images.tsv, "
                        "counted in the summary and the provenance)")


def data_spec(args: argparse.Namespace) -> str:
    """``--data`` with the data flags turned into the source's options (they travel with the
    spec to every Ray worker and into provenance)."""
    from engine.data.sources import with_options

    spec = with_options(args.data, "--image-size", size=args.image_size)
    spec = with_options(spec, "--eval-transform", eval=args.eval_transform)
    return with_options(spec, "--bad-images", bad=args.bad_images)


def add_train_transform_flag(p: argparse.ArgumentParser, what: str) -> None:
    from engine.data.transforms import TRAIN_TRANSFORMS

    p.add_argument("--train-transform", choices=TRAIN_TRANSFORMS, default=None,
                   help=f"augmentation of {what}, seeded by (seed, epoch, sample_id): rrc-flip (RandomResizedCrop "
                        "+ flip, ImageNet's), pad-crop-flip (4 px pad, random crop, flip: CIFAR's), flip or none. "
                        "Default: the source's (imagefolder and parquet: rrc-flip above 64 px, pad-crop-flip at 64 "
                        "or less; fashion-mnist, digits, synthetic: none)")


class Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one line (no usage dump) on a bad flag."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_optim_flags(p: argparse.ArgumentParser, defaults: OptimConfig = OptimConfig()) -> None:
    g = p.add_argument_group("optimiser")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="samples per SGD step (per worker)")
    g.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate, cosine-decayed to 0")
    g.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD Nesterov momentum")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="L2 weight decay")


def optim_from(args: argparse.Namespace) -> OptimConfig:
    cfg = OptimConfig(args.batch_size, args.lr, args.momentum, args.weight_decay)
    cfg.validate()
    return cfg


def int_list(text: str) -> tuple:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> tuple:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
