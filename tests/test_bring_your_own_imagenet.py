"""End to end on a generated ImageNet-shaped tree (class folders, JPEGs of varied sizes and
aspect ratios, a grayscale JPEG, a CMYK JPEG, a PNG named .JPEG, one truncated file):
jobs.score -> jobs.select -> jobs.train, and the same images as an image folder, as Hugging
Face Parquet and as WebDataset shards give the same score table (issue 30, slice 4)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine import artifacts
from engine.data.base import stable_id
from tests.imagenet_tree import make_tree, to_hf_parquet, to_webdataset

CLASSES = ("n01440764", "n01443537", "n02102040")


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    base = tmp_path_factory.mktemp("inet")
    odd = make_tree(base / "folder", CLASSES, train_per_class=8, val_per_class=2, truncated=True)
    to_hf_parquet(base / "folder", base / "hf")
    to_webdataset(base / "folder", base / "wds", per_shard=6)
    return base, odd


def test_score_select_train_on_every_format(ray_local, run_job, inet, tmp_path, monkeypatch):
    from jobs import score, select, train

    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    base, odd = inet
    specs = {"imagefolder": f"imagefolder:{base / 'folder'}", "parquet": f"parquet:{base / 'hf'}",
             "webdataset": f"webdataset:{base / 'wds'}"}
    tables = {}
    for name, spec in specs.items():
        code, out, err = run_job(score, ["--data", spec, "--image-size", "32", "--bad-images", "skip",
                                         "--scores", "el2n,forgetting", "--seeds", "2", "--epochs", "2",
                                         "--batch-size", "8", "--out", tmp_path / name])
        assert code == 0, (name, err)
        assert "skipped 1 image file(s) that do not decode" in out, name
        tables[name] = artifacts.read_table(tmp_path / name / "scores.parquet", "score table")
    ref, meta = tables["imagefolder"]
    n_train = len(CLASSES) * 8  # the truncated file is left out
    assert ref.num_rows == n_train and stable_id(odd["truncated"]) not in set(ref.column("sample_id").to_pylist())
    assert meta["transforms"] == {"train": "pad-crop-flip", "eval": "center-crop", "image_size": [32, 32]}
    for name in ("parquet", "webdataset"):
        table, m = tables[name]
        assert table.column("sample_id").to_pylist() == ref.column("sample_id").to_pylist(), name
        assert table.column("label").to_pylist() == ref.column("label").to_pylist(), name
        for col in ("el2n", "forgetting"):
            np.testing.assert_allclose(table.column(col).to_numpy(), ref.column(col).to_numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name} {col}")
        assert m["skipped_images"] == 1 and m["transforms"] == meta["transforms"], name

    manifest = tmp_path / "m.parquet"
    code, _, err = run_job(select, ["--scores", tmp_path / "webdataset" / "scores.parquet", "--selector", "topk",
                                    "--column", "el2n", "--fraction", "0.5", "--out", manifest])
    assert code == 0, err
    ids, _, _ = artifacts.read_manifest(manifest)
    code, out, err = run_job(train, ["--data", specs["webdataset"], "--image-size", "72", "--bad-images", "skip",
                                     "--manifest", manifest, "--epochs", "2", "--batch-size", "8",
                                     "--loader", "ray-data",  # the shards' JPEG bytes stream, rrc-flip in the worker
                                     "--out", tmp_path / "train"])
    assert code == 0, err
    m = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert m["train_size"] == len(ids) == n_train // 2 and m["samples_seen"] == 2 * len(ids)
    assert m["transforms"] == {"train": "rrc-flip", "eval": "center-crop", "image_size": [72, 72]}
    assert m["data_rows"] == {"train": n_train, "test": len(CLASSES) * 2} and m["skipped_images"] == 1
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["loader"] == "ray-data"
