"""imagefolder: images of any size and mode, the ILSVRC layout and one-folder-per-class trees,
local or through any pyarrow filesystem (file:// and S3, the latter against moto's S3 server
on loopback), torchvision's class indices and evaluation geometry (issue 30, slice 1)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.data import load_source
from engine.data.base import stable_id
from engine.errors import ConfigError, DataError
from tests.imagenet_tree import make_tree, pil_rgb

CLASSES = ("n01440764", "n01443537", "n02102040")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc")
    odd = make_tree(root, CLASSES)
    return root, odd


def torchvision_eval(im, resize, crop):
    from torchvision import transforms

    return np.asarray(transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])(im))


def test_ilsvrc_layout_classes_ids_and_splits(tree):
    root, _ = tree
    src = load_source(f"imagefolder,size=32:{root}")
    info = src.info()
    assert info.class_names == CLASSES and info.num_classes == 3 and info.image_shape == (32, 32, 3)
    assert (src.num_rows("train"), src.num_rows("test")) == (18, 6)
    train, test = src.arrays("train"), src.arrays("test")
    assert train.image.shape == (18, 32, 32, 3) and train.image.dtype == np.uint8
    # ids from the path relative to the root; labels as torchvision's ImageFolder assigns them
    from torchvision.datasets import ImageFolder

    tv = ImageFolder(str(root / "train"))
    assert tv.classes == list(CLASSES)
    expect = {stable_id(str(p.relative_to(root))): label for p, label in
              ((__import__("pathlib").Path(p), lab) for p, lab in tv.samples)}
    assert dict(zip(train.sample_id.tolist(), train.label.tolist())) == expect
    assert test.label.tolist() == [0, 0, 1, 1, 2, 2]
    assert stable_id("val/n01440764/n01440764_0.JPEG") in test.sample_id
    # stable under re-listing
    again = load_source(f"imagefolder,size=32:{root}").arrays("train")
    assert np.array_equal(again.sample_id, train.sample_id) and np.array_equal(again.image, train.image)


@pytest.mark.parametrize("size", [32, 224])
def test_any_size_and_mode_matches_torchvision(tree, size):
    """Every image, whatever its size or mode (grayscale, CMYK, palette, RGBA, a PNG named
    .JPEG), becomes RGB and goes through torchvision's Resize + CenterCrop geometry (exactly,
    unless a JPEG is large enough for libjpeg to decode it at a reduced scale)."""
    from PIL import Image

    root, odd = tree
    src = load_source(f"imagefolder,size={size}:{root}")
    rows = src.arrays("train")
    resize = size if size <= 64 else int(size / 0.875)
    by_id = {int(i): k for k, i in enumerate(rows.sample_id)}
    rels = [rel for rel, _ in src.lists["train"]]
    assert set(odd.values()) <= set(rels)
    drafted = 0
    for rel in rels:
        got = rows.image[by_id[stable_id(rel)]]
        want = torchvision_eval(pil_rgb(root, rel), resize, size)
        assert got.shape == want.shape == (size, size, 3)
        with Image.open(root / rel) as im:
            draft = im.format == "JPEG" and min(im.size) // 2 >= 2 * resize  # decoded at 1/2 or less
        if draft:  # decoded at a reduced scale (PIL's draft mode): close to, not equal to, the full decode
            drafted += 1
            # (a sub-pixel shift of the grid decorrelates single pixels of these noisy images: compare 4x4 means)
            blocks = [a.astype(float).reshape(size // 4, 4, size // 4, 4, 3).mean((1, 3)) for a in (got, want)]
            assert np.abs(blocks[0] - blocks[1]).mean() < 4, rel
        else:
            assert np.array_equal(got, want), rel
    assert (drafted > 0) == (size == 32)


def test_default_size_is_the_first_images_shorter_side_at_most_224(tmp_path):
    make_tree(tmp_path / "big", CLASSES[:2], train_per_class=2, val_per_class=1, sizes=((375, 500), (500, 333)))
    assert load_source(f"imagefolder:{tmp_path / 'big'}").info().image_shape == (224, 224, 3)
    make_tree(tmp_path / "small", CLASSES[:2], train_per_class=2, val_per_class=1, ilsvrc=False,
              sizes=((28, 30), (40, 33)))
    src = load_source(f"imagefolder:{tmp_path / 'small'}")
    first = src.lists["train"][0][0]
    w, h = pil_rgb(tmp_path / "small", first).size
    assert src.info().image_shape == (min(w, h), min(w, h), 3)
    assert src.arrays("train").image.shape[1:] == (min(w, h), min(w, h), 3)


def test_one_folder_per_class_tree_holds_out_a_test_split(tmp_path):
    make_tree(tmp_path / "t", CLASSES, train_per_class=12, ilsvrc=False)
    src = load_source(f"imagefolder,size=16:{tmp_path / 't'}")
    train, test = src.arrays("train"), src.arrays("test")
    assert len(train) + len(test) == 36 and len(test) > 0
    assert not np.intersect1d(train.sample_id, test.sample_id).size


def test_truncated_image_fails_naming_it_and_what_was_read(tmp_path):
    odd = make_tree(tmp_path / "t", CLASSES[:2], train_per_class=3, val_per_class=1, truncated=True)
    src = load_source(f"imagefolder,size=16:{tmp_path / 't'}")
    with pytest.raises(DataError, match=rf"cannot decode image {odd['truncated']}: .*truncated.*image\(s\) of this "
                                        rf"7-file part of the train split read before it"):
        src.arrays("train")


def test_bad_trees_are_refused(tmp_path, monkeypatch):
    make_tree(tmp_path / "t", CLASSES[:2], train_per_class=2, val_per_class=1)
    (tmp_path / "t" / "train" / "n09999999").mkdir()
    with pytest.raises(DataError, match="class folder train/n09999999 has no images"):
        load_source(f"imagefolder:{tmp_path / 't'}")
    (tmp_path / "t" / "train" / "n09999999").rmdir()
    make_tree(tmp_path / "t2", CLASSES[:2], train_per_class=2, val_per_class=1)
    (tmp_path / "t2" / "val" / "n07777777").mkdir()
    (tmp_path / "t2" / "val" / "n01440764" / "n01440764_0.JPEG").rename(tmp_path / "t2" / "val" / "n07777777" / "x.JPEG")
    with pytest.raises(DataError, match="val class folder 'n07777777' is not among the training classes"):
        load_source(f"imagefolder:{tmp_path / 't2'}")
    import engine.data.files as files

    monkeypatch.setattr(files, "stable_id", lambda rel: 7)
    with pytest.raises(DataError, match="hash to the same sample_id; rename one"):
        load_source(f"imagefolder:{tmp_path / 't'}")


def test_spec_options_are_checked():
    with pytest.raises(ConfigError, match=r"'colour=red' is not an option of 'imagefolder' \(size=..., bad=..., eval=...\)"):
        load_source("imagefolder,colour=red:/x")
    with pytest.raises(ConfigError, match="option size='big' is not a int"):
        load_source("imagefolder,size=big:/x")
    with pytest.raises(ConfigError, match="size=0 must be between"):
        load_source("imagefolder,size=0:/x")
    with pytest.raises(ConfigError, match="unknown evaluation transform 'squash'; known: center-crop, resize"):
        load_source("imagefolder,eval=squash:/x")
    with pytest.raises(ConfigError, match="'size=3' is not an option of 'digits' \\(it takes none\\)"):
        load_source("digits,size=3")


def test_file_uri_reads_the_same_rows(tree):
    root, _ = tree
    local = load_source(f"imagefolder,size=24:{root}").arrays("train")
    uri = load_source(f"imagefolder,size=24:file://{root}").arrays("train")
    assert np.array_equal(local.sample_id, uri.sample_id) and np.array_equal(local.image, uri.image)


def test_s3_tree_through_a_real_s3_api_on_loopback(tree, monkeypatch):
    """The same tree uploaded to moto's S3 server (real HTTP, the S3 REST API) on 127.0.0.1:
    listed and read through pyarrow's S3 filesystem, partitions re-opened from the URI as Ray
    workers do; same ids, labels and pixels as the local folder."""
    import boto3
    from moto import server as moto_server  # a dev dependency: missing is a failure, not a skip
    root, _ = tree
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket="imagenet")
        for p in sorted(root.rglob("*")):
            if p.is_file():
                s3.upload_file(str(p), "imagenet", f"ilsvrc/{p.relative_to(root).as_posix()}")
        uri = f"s3://imagenet/ilsvrc?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        src = load_source(f"imagefolder,size=24:{uri}")
        assert src.info().class_names == CLASSES
        local = load_source(f"imagefolder,size=24:{root}")
        for split in ("train", "test"):
            got, want = src.arrays(split), local.arrays(split)
            assert np.array_equal(got.sample_id, want.sample_id) and np.array_equal(got.label, want.label)
            assert np.array_equal(got.image, want.image)
        assert src.content_key() != local.content_key()  # the spec differs; the key still names the files
    finally:
        server.stop()


def test_a_bad_image_stops_a_job_with_one_line(ray_local, run_job, tmp_path):
    """--bad-images fail (the default): one line naming the file, exit 2, nothing written."""
    from jobs import score

    odd = make_tree(tmp_path / "t", CLASSES[:2], train_per_class=3, val_per_class=1, truncated=True)
    out = tmp_path / "run"
    code, _, err = run_job(score, ["--data", f"imagefolder,size=16:{tmp_path / 't'}", "--scores", "el2n",
                                   "--seeds", "1", "--epochs", "1", "--out", out])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and lines[-1].startswith(f"jobs.score: error: imagefolder: cannot decode image {odd['truncated']}")
    assert "Traceback" not in err and "ray::" not in err and "read before it" in lines[-1], err
    assert not (out / "scores.parquet").exists()


def test_skip_leaves_out_what_does_not_decode_and_caches_the_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    odd = make_tree(tmp_path / "t", CLASSES[:2], train_per_class=3, val_per_class=1, truncated=True)
    (tmp_path / "t" / "val" / "n01443537" / "junk.JPEG").write_bytes(b"not an image at all")
    src = load_source(f"imagefolder,size=16,bad=skip:{tmp_path / 't'}")
    assert [rel for rel, _ in src.skipped] == [odd["truncated"], "val/n01443537/junk.JPEG"]
    assert "truncated" in src.skipped[0][1]
    assert (src.num_rows("train"), src.num_rows("test")) == (6, 2)
    assert stable_id(odd["truncated"]) not in src.arrays("train").sample_id
    assert len(list((tmp_path / "cache" / "bad-images").iterdir())) == 1
    # a second opening of the same spec (a Ray worker, a rerun) reads the verdicts, decodes nothing
    import engine.data.images as images

    monkeypatch.setattr(images, "decode_rgb", lambda *a: pytest.fail("decoded again"))
    again = load_source(f"imagefolder,size=16,bad=skip:{tmp_path / 't'}")
    assert again.skipped == src.skipped and again.lists == src.lists


def test_bad_images_flag_is_checked(run_job, tmp_path):
    from jobs import score

    code, _, err = run_job(score, ["--data", "digits", "--bad-images", "skip", "--out", tmp_path / "r"])
    assert code == 2 and "--bad-images applies to imagefolder:, parquet:, webdataset: sources, not 'digits'" in err
    code, _, err = run_job(score, ["--data", "digits", "--image-size", "64", "--out", tmp_path / "r"])
    assert code == 2 and "--image-size applies to imagefolder:, parquet:, webdataset: sources, not 'digits'" in err
    from jobs._cli import data_spec
    from jobs.score import build_parser

    assert data_spec(build_parser().parse_args(["--data", "imagefolder,size=8:/d", "--image-size", "64",
                                                "--bad-images", "skip"])) == "imagefolder,size=64,bad=skip:/d"
    code, _, err = run_job(score, ["--data", "imagefolder,bad=maybe:/x", "--out", tmp_path / "r"])
    assert code == 2 and "bad='maybe': expected one of fail, skip" in err
    assert not (tmp_path / "r").exists()


def test_skip_through_the_jobs_lists_and_counts_what_was_left_out(ray_local, run_job, tmp_path, monkeypatch):
    import json

    from engine import artifacts
    from jobs import score, train

    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    odd = make_tree(tmp_path / "t", CLASSES[:2], train_per_class=4, val_per_class=1, truncated=True)
    data = f"imagefolder,size=16:{tmp_path / 't'}"
    code, out, err = run_job(score, ["--data", data, "--bad-images", "skip", "--scores", "el2n", "--seeds", "1",
                                     "--epochs", "1", "--out", tmp_path / "s"])
    assert code == 0, err
    assert "skipped 1 image file(s) that do not decode (--bad-images skip)" in out
    listed = (tmp_path / "s" / "skipped_images.tsv").read_text().splitlines()
    assert listed[0] == "path\treason" and listed[1].startswith(f"{odd['truncated']}\t")
    table, meta = artifacts.read_table(tmp_path / "s" / "scores.parquet", "score table")
    assert meta["skipped_images"] == 1 and meta["bad_images"] == "skip" and table.num_rows == 8
    assert stable_id(odd["truncated"]) not in table.column("sample_id").to_numpy()
    code, out, err = run_job(train, ["--data", data, "--bad-images", "skip", "--epochs", "1",
                                     "--out", tmp_path / "tr"])
    assert code == 0, err
    metrics = json.loads((tmp_path / "tr" / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and metrics["train_size"] == 8
    assert (tmp_path / "tr" / "skipped_images.tsv").is_file()
