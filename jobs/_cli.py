"""What every job shares: the runner (``engine.entry``: one line per user error, exit 2; one
line per signal, exit 130 or 143), run directories (``engine.rundir``) and the common flags.

Either way no output file is left behind: artifacts are written atomically, and a run
directory this invocation created is removed again when the job fails.
"""
from __future__ import annotations

import argparse
import dataclasses

from engine.config import OptimConfig
from engine.entry import Parser, entry, run  # noqa: F401  (the jobs' runner, re-exported)
from engine.rundir import output_dir, report_skipped, start_fresh  # noqa: F401  (the jobs' helpers, re-exported)

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


def config_from_args(cls, args: argparse.Namespace, **given):
    """A checked config from parsed flags: each field from the flag of its name
    (``--score-batch-size`` -> ``score_batch_size``), then ``given``."""
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{**{k: v for k, v in vars(args).items() if k in names}, **given})
    cfg.validate()
    return cfg
