"""Named transforms against torchvision's reference implementations on the same inputs, and
seeded augmentation: reproducible for a (seed, epoch, sample), different across epochs
(issue 30, slice 2)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from engine.data.transforms import (
    augment_batch,
    eval_geometry,
    pad_crop_flip,
    random_resized_crop_flip,
    resize_center_crop,
    rrc_params,
    sample_rng,
)
from engine.errors import ConfigError
from tests.imagenet_tree import _smooth


def photo(h=375, w=500, seed=0):
    return Image.fromarray(_smooth(np.random.default_rng(seed), h, w))


@pytest.mark.parametrize("size, shape", [(224, (375, 500)), (224, (500, 333)), (160, (212, 139)), (32, (36, 40)),
                                         (28, (28, 28))])
def test_eval_transform_is_torchvisions_resize_and_center_crop(size, shape):
    from torchvision import transforms

    im = photo(*shape)
    resize, crop = eval_geometry(size)
    assert resize == (size if size <= 64 else int(size / 0.875))
    want = np.asarray(transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])(im))
    assert np.array_equal(resize_center_crop(im, resize, crop), want)


@pytest.mark.parametrize("seed", range(8))
def test_random_resized_crop_matches_torchvision_for_its_draws(seed):
    im = photo(seed=seed)
    ours = random_resized_crop_flip(im, 224, np.random.default_rng(seed))
    replay = np.random.default_rng(seed)
    top, left, h, w = rrc_params(replay, im.size[1], im.size[0])
    flip = replay.random() < 0.5
    ref = TF.resized_crop(im, top, left, h, w, [224, 224], interpolation=InterpolationMode.BILINEAR, antialias=True)
    ref = np.asarray(TF.hflip(ref) if flip else ref)
    assert ours.shape == (224, 224, 3) and np.array_equal(ours, ref)


def test_rrc_params_follow_torchvisions_distribution_and_fallback():
    from torchvision.transforms import RandomResizedCrop

    # a 10 x 1000 strip: every try fails, both fall back to the same central crop
    assert rrc_params(np.random.default_rng(0), 10, 1000) == \
        tuple(RandomResizedCrop.get_params(torch.zeros(3, 10, 1000), [0.08, 1.0], [3 / 4, 4 / 3]))
    rng, n = np.random.default_rng(1), 3000
    torch.manual_seed(1)
    ours = np.array([rrc_params(rng, 300, 400) for _ in range(n)], dtype=float)
    ref = np.array([RandomResizedCrop.get_params(torch.zeros(3, 300, 400), [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(n)], dtype=float)
    for stat in (lambda p: p[:, 2] * p[:, 3] / 120000, lambda p: np.log(p[:, 3] / p[:, 2]), lambda p: p[:, 0]):
        assert abs(stat(ours).mean() - stat(ref).mean()) < 4 * stat(ref).std() / np.sqrt(n) + 1e-3
    assert (ours[:, 0] + ours[:, 2] <= 300).all() and (ours[:, 1] + ours[:, 3] <= 400).all()


@pytest.mark.parametrize("seed", range(6))
def test_pad_crop_flip_matches_torchvisions_random_crop_and_flip(seed):
    image = _smooth(np.random.default_rng(seed), 32, 32)
    ours = pad_crop_flip(image, np.random.default_rng(seed))
    replay = np.random.default_rng(seed)
    top, left = int(replay.integers(0, 9)), int(replay.integers(0, 9))
    flip = replay.random() < 0.5
    ref = TF.crop(TF.pad(Image.fromarray(image), 4, fill=0), top, left, 32, 32)
    ref = np.asarray(TF.hflip(ref) if flip else ref)
    assert np.array_equal(ours, ref)


def test_augmentation_is_reproducible_per_sample_and_differs_across_epochs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    ids = rng.integers(0, 2**62, 16)
    a = augment_batch(images, ids, "pad-crop-flip", seed=3, epoch=1)
    assert np.array_equal(a, augment_batch(images, ids, "pad-crop-flip", seed=3, epoch=1))
    # a sample's draw does not depend on its batch (resume, resharding, another batch size)
    assert np.array_equal(augment_batch(images[5:9], ids[5:9], "pad-crop-flip", seed=3, epoch=1), a[5:9])
    assert not np.array_equal(a, augment_batch(images, ids, "pad-crop-flip", seed=3, epoch=2))
    assert not np.array_equal(a, augment_batch(images, ids, "pad-crop-flip", seed=4, epoch=1))
    flips = augment_batch(images, ids, "flip", seed=0, epoch=0)
    flipped = [np.array_equal(f, im[:, ::-1]) for f, im in zip(flips, images)]
    assert all(np.array_equal(f, im) or fl for f, im, fl in zip(flips, images, flipped)) and 0 < sum(flipped) < 16
    assert augment_batch(images, ids, "none", seed=0, epoch=0) is images
    assert sample_rng(1, 2, 2**40 + 5).random() != sample_rng(1, 2, 5).random()  # all 64 id bits count


def test_draft_decoding_is_smaller_and_close_to_the_full_decode():
    from engine.data.images import decode_rgb

    buf = io.BytesIO()
    photo(1200, 1600).save(buf, format="JPEG", quality=90)
    full = decode_rgb(buf.getvalue(), "big.jpg")
    drafted = decode_rgb(buf.getvalue(), "big.jpg", min_side=256)
    assert full.size == (1600, 1200) and drafted.size == (800, 600)  # libjpeg's 1/2 scale: >= 2 x 256 a side
    a, b = (resize_center_crop(im, 256, 224).astype(int) for im in (full, drafted))
    assert np.abs(a - b).mean() < 3.0


@pytest.mark.parametrize("size, shape", [(224, (375, 500)), (160, (212, 139)), (32, (36, 40))])
def test_eval_transform_resize_is_torchvisions_resize_s_and_center_crop(size, shape):
    from torchvision import transforms

    im = photo(*shape)
    resize, crop = eval_geometry(size, "resize")
    assert (resize, crop) == (size, size)
    want = np.asarray(transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])(im))
    assert np.array_equal(resize_center_crop(im, resize, crop), want)
    with pytest.raises(ConfigError, match="unknown evaluation transform 'fill'"):
        eval_geometry(size, "fill")


@pytest.mark.parametrize("seed", range(4))
def test_rrc_on_encoded_bytes_is_the_reference_on_the_full_image(seed):
    """A PNG (no draft): pixel-equal to RandomResizedCrop + flip on the decoded image."""
    from engine.data.images import decode_rrc_flip

    buf = io.BytesIO()
    photo(300, 420, seed).save(buf, format="PNG")
    ours = decode_rrc_flip(buf.getvalue(), "x.png", 96, np.random.default_rng(seed))
    ref = random_resized_crop_flip(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 96,
                                   np.random.default_rng(seed))
    assert ours.shape == (96, 96, 3) and np.array_equal(ours, ref)


def test_rrc_on_a_large_jpeg_decodes_only_what_the_crop_needs(monkeypatch):
    """The crop is drawn on the full size; libjpeg then decodes at a reduced scale that keeps
    >= 2x the output on the crop's shorter side; the result stays close to the full decode."""
    from engine.data import images as files

    buf = io.BytesIO()
    photo(1200, 1600).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    seen = []
    real = files.decode_rgb
    monkeypatch.setattr(files, "decode_rgb", lambda d, w, min_side=None: seen.append(real(d, w, min_side)) or seen[-1])
    diffs, drafted = [], 0
    for seed in range(12):
        ours = files.decode_rrc_flip(data, "big.jpg", 112, np.random.default_rng(seed))
        full = random_resized_crop_flip(real(data, "big.jpg"), 112, np.random.default_rng(seed))
        params = rrc_params(np.random.default_rng(seed), 1200, 1600)
        scale = seen[-1].size[0] / 1600
        assert min(params[2], params[3]) * scale >= 2 * 112 or scale == 1.0  # never below 2x the output
        drafted += scale < 1.0
        diffs.append(np.abs(ours.astype(int) - full.astype(int)).mean())
    assert drafted >= 6 and max(diffs) < 4.0, (drafted, diffs)


def test_rrc_on_stored_fixed_size_images_keeps_their_shape():
    rng = np.random.default_rng(0)
    for shape in ((28, 28, 1), (24, 40, 3)):
        images = rng.integers(0, 256, (5, *shape), dtype=np.uint8)
        ids = np.arange(5) * 7
        a = augment_batch(images, ids, "rrc-flip", seed=1, epoch=3)
        assert a.shape == images.shape and np.array_equal(a, augment_batch(images, ids, "rrc-flip", seed=1, epoch=3))
        assert not np.array_equal(a, augment_batch(images, ids, "rrc-flip", seed=1, epoch=4))
        im = Image.fromarray(images[2][..., 0] if shape[2] == 1 else images[2])
        assert np.array_equal(a[2], random_resized_crop_flip(im, shape[:2], sample_rng(1, 3, 14)))
