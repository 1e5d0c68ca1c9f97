"""Training transforms wired into training (issue 30, slice 2): a source of images of any size
crops the decoded original for rrc-flip, draws depend on (seed, epoch, sample_id) only, both
loaders apply the transform, and metrics.json records the transforms."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.data import load_source
from engine.data.base import stable_id
from engine.data.transforms import random_resized_crop_flip, sample_rng
from engine.errors import DataError
from tests.imagenet_tree import make_tree, pil_rgb

CLASSES = ("n01440764", "n01443537", "n02102040")  # three: the third odd file is a PNG named .JPEG


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug")
    odd = make_tree(root, CLASSES, train_per_class=4, val_per_class=1)
    return root, odd


def test_imagefolder_rrc_crops_the_original_file(tree):
    root, odd = tree
    src = load_source(f"imagefolder,size=72:{root}")
    assert src.info().train_transform == "rrc-flip" and src.info().eval_transform == "center-crop"
    rows = src.arrays("train")
    a = src.augment(rows.image, rows.sample_id, "rrc-flip", seed=2, epoch=1)
    assert a.shape == rows.image.shape and a.dtype == np.uint8
    # a PNG (named .JPEG) decodes in full: exactly RandomResizedCrop + flip of the original file
    i = int(np.flatnonzero(rows.sample_id == stable_id(odd["png_named_jpeg"]))[0])
    want = random_resized_crop_flip(pil_rgb(root, odd["png_named_jpeg"]), 72, sample_rng(2, 1, rows.sample_id[i]))
    assert np.array_equal(a[i], want)
    # not a crop of the evaluation image: the draw sees the whole file
    assert not np.array_equal(a, src.augment(rows.image, rows.sample_id, "none", seed=2, epoch=1))
    # per sample: the same in any batch, in another process's source; another epoch differs
    assert np.array_equal(src.augment(rows.image[3:5], rows.sample_id[3:5], "rrc-flip", 2, 1), a[3:5])
    again = load_source(f"imagefolder,size=72:{root}")
    assert np.array_equal(again.augment(rows.image, rows.sample_id, "rrc-flip", 2, 1), a)
    assert not np.array_equal(src.augment(rows.image, rows.sample_id, "rrc-flip", 2, 2), a)
    # the transforms that need no original work on the evaluation images
    flipped = src.augment(rows.image, rows.sample_id, "flip", 2, 1)
    assert all(np.array_equal(f, im) or np.array_equal(f, im[:, ::-1]) for f, im in zip(flipped, rows.image))
    with pytest.raises(DataError, match="sample_id 5 is not in the training split"):
        src.augment(rows.image[:1], np.array([5]), "rrc-flip", 2, 1)


def test_defaults_per_source_kind(tree):
    root, _ = tree
    assert load_source(f"imagefolder,size=32:{root}").info().train_transform == "pad-crop-flip"
    assert load_source(f"imagefolder,size=32,eval=resize:{root}").info().eval_transform == "resize"
    for spec in ("digits", "fashion-mnist-mini", "synthetic:10"):
        assert load_source(spec).info().train_transform == "none"
        assert load_source(spec).info().eval_transform is None


def _weights(path):
    return torch.load(path, map_location="cpu")


def test_both_loaders_train_with_the_transform_and_record_it(ray_local, run_job, tree, tmp_path):
    from jobs import train

    root, _ = tree
    data = f"imagefolder,size=72:{root}"
    common = ["--data", data, "--epochs", "2", "--batch-size", "8", "--seed", "3"]
    runs = {"default": [], "none": ["--train-transform", "none"], "stream": ["--loader", "ray-data"],
            "stream-none": ["--loader", "ray-data", "--train-transform", "none"]}
    for name, extra in runs.items():
        code, _, err = run_job(train, [*common, *extra, "--out", tmp_path / name])
        assert code == 0, err
    m = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs}
    assert m["default"]["transforms"] == {"train": "rrc-flip", "eval": "center-crop", "image_size": [72, 72]}
    assert m["none"]["transforms"]["train"] == "none" and m["none"]["config"]["train_transform"] == "none"
    assert m["stream"]["transforms"]["train"] == "rrc-flip" and m["stream"]["samples_seen"] == 2 * 12
    # the transform reached both loops: the same run without it ends with other weights
    for run, plain in (("default", "none"), ("stream", "stream-none")):
        a, b = _weights(tmp_path / run / "model.pt"), _weights(tmp_path / plain / "model.pt")
        assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point()), run


def test_train_transform_flag_is_checked(run_job, tmp_path):
    from jobs import train

    code, _, err = run_job(train, ["--data", "digits", "--train-transform", "mixup", "--out", tmp_path / "t"])
    assert code == 2 and "argument --train-transform: invalid choice: 'mixup'" in err, err
    code, _, err = run_job(train, ["--data", "digits", "--eval-transform", "resize", "--out", tmp_path / "t"])
    assert code == 2 and "--eval-transform applies to imagefolder:, parquet:, webdataset: sources, not 'digits'" in err, err
    assert not (tmp_path / "t").exists()


def test_proxies_train_with_the_transform_and_the_score_table_records_it(ray_local, run_job, tree, tmp_path):
    from engine import artifacts
    from jobs import score

    root, _ = tree
    common = ["--data", f"imagefolder,size=32:{root}", "--scores", "el2n,forgetting", "--seeds", "1",
              "--epochs", "2", "--batch-size", "8"]
    for name, extra in (("default", []), ("none", ["--train-transform", "none"])):
        code, _, err = run_job(score, [*common, *extra, "--out", tmp_path / name])
        assert code == 0, err
    (a, meta), (b, plain) = (artifacts.read_table(tmp_path / n / "scores.parquet", "score table")
                             for n in ("default", "none"))
    assert meta["transforms"] == {"train": "pad-crop-flip", "eval": "center-crop", "image_size": [32, 32]}
    assert plain["transforms"]["train"] == "none" and plain["config"]["train_transform"] == "none"
    # the proxies saw augmented images: another training loss, other scores for the same ids
    assert meta["proxy_train_loss"] != plain["proxy_train_loss"]
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    assert not np.allclose(a.column("el2n").to_numpy(), b.column("el2n").to_numpy())
