"""Image transforms: normalisation, and the torchvision reference recipes as named transforms.

Evaluation and scoring, by name (``EVAL_TRANSFORMS``; ``eval_geometry`` + ``resize_center_crop``),
for sources whose images have any size:

- ``center-crop`` (the default): the shorter side resized to S/0.875 and a center crop of S,
  torchvision's ImageNet reference (``Resize`` + ``CenterCrop``); images of at most 64 px a side
  are resized to S and center-cropped (no margin);
- ``resize``: the shorter side resized to S and a center crop of S (the whole shorter side kept).

Training transforms, by name (``TRAIN_TRANSFORMS``):

- ``none``: the image as it is;
- ``flip``: horizontal flip with probability 1/2;
- ``pad-crop-flip``: zero-pad 4 px, a random S x S crop, flip (the CIFAR recipe: torchvision's
  ``RandomCrop(S, padding=4)`` + ``RandomHorizontalFlip``), for 28-32 px data;
- ``rrc-flip``: ``RandomResizedCrop(S)`` (scale 0.08-1, aspect ratio 3/4-4/3, bilinear) +
  flip, the ImageNet recipe, applied to the decoded image before any resize.

Every random draw comes from ``sample_rng(seed, epoch, sample_id)``: a run reproduces exactly,
a resumed run continues with the draws it would have made, and each epoch differs.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch

from engine.errors import ConfigError

SMALL_IMAGE = 64  # at most this many pixels a side: no 0.875 crop margin (CIFAR-style data)
TRAIN_TRANSFORMS = ("none", "flip", "pad-crop-flip", "rrc-flip")
EVAL_TRANSFORMS = ("center-crop", "resize")
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


def normalize(images, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W, C] (torch or numpy) -> float32 [N, C, H, W], ``(x/255 - mean)/std``."""
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = t.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def check_train_transform(name: str) -> str:
    if name not in TRAIN_TRANSFORMS:
        raise ConfigError(f"unknown training transform {name!r}; known: {', '.join(TRAIN_TRANSFORMS)}")
    return name


def check_eval_transform(name: str) -> str:
    if name not in EVAL_TRANSFORMS:
        raise ConfigError(f"unknown evaluation transform {name!r}; known: {', '.join(EVAL_TRANSFORMS)}")
    return name


def default_train_transform(size: int, flippable: bool = True) -> str:
    """The reference recipe for output side ``size``: ImageNet's above 64 px, CIFAR's below;
    ``none`` for data that must not be flipped (digits)."""
    if not flippable:
        return "none"
    return "pad-crop-flip" if size <= SMALL_IMAGE else "rrc-flip"


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The random stream of one sample in one epoch of one run: independent across the three."""
    sid = int(sample_id)
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, sid & 0xFFFFFFFF,
                                  (sid >> 32) & 0xFFFFFFFF, 0x57494E4E])  # "WINN": Winnow's stream


def eval_geometry(size: int, name: str = "center-crop") -> Tuple[int, int]:
    """(resize, crop) of the evaluation transform ``name`` for output side ``size``."""
    if check_eval_transform(name) == "resize" or size <= SMALL_IMAGE:
        return size, size
    return int(size / 0.875), size


def resize_center_crop(im, resize: int, crop: int) -> np.ndarray:
    """A PIL image -> uint8 [crop, crop, C], as torchvision's ``Resize(resize)`` (shorter side
    to ``resize``, the other ``int(resize * long / short)``, bilinear) then ``CenterCrop(crop)``.
    For an image decoded at a reduced scale (``decode_rgb``'s draft), the output size follows
    from the full image's size (``im.info["full_size"]``), as it would without the draft."""
    from PIL import Image

    w, h = im.info.get("full_size", im.size)
    short, long = (w, h) if w <= h else (h, w)
    if short != resize or im.size != (w, h):
        new_long = int(resize * long / short)
        im = im.resize((resize, new_long) if w <= h else (new_long, resize), Image.BILINEAR)
    w, h = im.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def rrc_params(rng: np.random.Generator, height: int, width: int, scale=RRC_SCALE, ratio=RRC_RATIO):
    """(top, left, h, w) of a random resized crop: torchvision's
    ``RandomResizedCrop.get_params`` (10 tries, then a central crop of the nearest allowed
    aspect ratio), drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(im, size: int, rng: np.random.Generator) -> np.ndarray:
    """``rrc-flip`` on a PIL image -> uint8 [size, size, C] (C=1 for a grayscale image).
    Draws: the crop (``rrc_params``), then the flip."""
    return finish_rrc_flip(im, rrc_params(rng, im.size[1], im.size[0]), size, rng)


def finish_rrc_flip(im, params: tuple, size: int, rng: np.random.Generator) -> np.ndarray:
    """The crop ``params`` (top, left, h, w, in the full image's pixels) of PIL image ``im``
    resized to ``size`` x ``size`` (or ``size`` = (height, width); bilinear), then flipped with probability 1/2 (``rng``'s
    next draw). ``im`` may be a reduced-scale decode of the full image (``decode_rgb``'s draft,
    ``im.info["full_size"]``): the crop box is then scaled to it."""
    from PIL import Image

    top, left, h, w = params
    out_wh = (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))
    fw, fh = im.info.get("full_size", im.size)
    if im.size == (fw, fh):  # exactly torchvision's F.resized_crop: crop, then resize the crop alone
        out = im.crop((left, top, left + w, top + h)).resize(out_wh, Image.BILINEAR)
    else:
        sx, sy = im.size[0] / fw, im.size[1] / fh
        out = im.resize(out_wh, Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    arr = np.asarray(out, dtype=np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return arr[:, ::-1].copy() if rng.random() < 0.5 else arr


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """``pad-crop-flip`` on uint8 [H, W, C]: zero-pad ``pad`` px, a random H x W crop, flip."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
    out = padded[top:top + h, left:left + w]
    return out[:, ::-1].copy() if rng.random() < 0.5 else out.copy()


def augment_batch(images: np.ndarray, sample_ids: np.ndarray, name: str, seed: int, epoch: int) -> np.ndarray:
    """Training transform ``name`` applied to a uint8 [N, H, W, C] batch of stored images,
    each sample by its own stream; the output has the input's shape. ``rrc-flip`` crops the
    stored image and resizes the crop back to H x W (for sources whose images have one fixed
    size; a source of images of any size crops the decoded original instead: ``Source.augment``)."""
    from PIL import Image

    check_train_transform(name)
    if name == "none":
        return images
    images = np.asarray(images)
    out = np.empty_like(images)
    for i, (image, sid) in enumerate(zip(images, sample_ids)):
        rng = sample_rng(seed, epoch, int(sid))
        if name == "flip":
            out[i] = image[:, ::-1] if rng.random() < 0.5 else image
        elif name == "pad-crop-flip":
            out[i] = pad_crop_flip(image, rng)
        else:
            im = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
            out[i] = random_resized_crop_flip(im, image.shape[:2], rng)
    return out


def transforms_of(train_transform, info) -> dict:
    """The transforms a run used, for provenance: training (the one asked for, else the
    source's default), evaluation (None: images stored at their size) and the image size."""
    return {"train": train_transform or info.train_transform, "eval": info.eval_transform,
            "image_size": list(info.image_shape[:2])}
