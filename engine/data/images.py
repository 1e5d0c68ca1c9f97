"""Encoded images of any size: decoding (by content, made RGB, JPEG draft), the evaluation
transform to S x S, the bad-image policy, and what every source of encoded images shares
(``EncodedImages``: imagefolder, Parquet of image bytes, WebDataset shards)."""
from __future__ import annotations

import io
import math
import os
import re
from typing import Callable, Iterable, Optional, Sequence, Tuple

import numpy as np

from engine.data.base import DataInfo
from engine.data.sources import GENERIC_MEAN, GENERIC_STD
from engine.data.transforms import (
    check_eval_transform,
    default_train_transform,
    eval_geometry,
    finish_rrc_flip,
    resize_center_crop,
    rrc_params,
    sample_rng,
)
from engine.errors import ConfigError, DataError

BAD_IMAGES = ("fail", "skip")  # an image that does not decode: stop with one line, or leave it out (listed)
DEFAULT_MAX_SIZE = 224          # the default S: the first training image's shorter side, at most this


PIL_MAX_PIXELS = 89_478_485  # PIL's own default limit (a 1024 x 1024 x 4 x 4 x 4 x 4 / 3 image)


def max_image_pixels() -> int:
    """The most pixels (width x height) an image may declare: ``$WINNOW_MAX_IMAGE_PIXELS``,
    default PIL's 89,478,485 (about 9,500 x 9,500; ImageNet's largest photos are far below).
    Above it the image is refused from its header, before a byte of it is decoded: a PNG of a
    few kilobytes can declare 100,000 x 100,000 pixels (30 GB decoded), a decompression bomb.
    PIL itself only warns below twice its limit; Winnow refuses at the limit."""
    raw = os.environ.get("WINNOW_MAX_IMAGE_PIXELS")
    if raw is None:
        return PIL_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"WINNOW_MAX_IMAGE_PIXELS must be a positive integer, got {raw!r}")
    return value


def open_image(data: bytes, where: str):
    """``PIL.Image.open`` of encoded bytes (lazy: only the header is read), refusing an image
    that declares more than ``max_image_pixels()`` pixels or that PIL cannot identify, with a
    DataError naming ``where``."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels()
    # PIL checks the header as it opens: it warns above MAX_IMAGE_PIXELS and refuses above twice
    # that; with its limit at ours, it refuses the largest bombs itself, and ours does the rest
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(declared.group(1)):,}" if declared else f"more than {2 * limit:,}"
        raise DataError(f"image {where} declares {size} pixels, above the limit of {limit:,} (a decompression "
                        f"bomb, or set WINNOW_MAX_IMAGE_PIXELS higher)") from None
    except UnidentifiedImageError:
        what = "it is empty" if not data else f"its {len(data):,} bytes are not an image file PIL can read"
        raise DataError(f"cannot decode image {where}: {what}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {where}: {exc}") from None
    w, h = im.size
    if w * h > limit:
        raise DataError(f"image {where} declares {w} x {h} = {w * h:,} pixels, above the limit of {limit:,} "
                        f"(a decompression bomb, or set WINNOW_MAX_IMAGE_PIXELS higher)")
    return im


def decode_rgb(data: bytes, where: str, min_side: Optional[int] = None):
    """Encoded bytes (by content, whatever the file's name says) -> an RGB PIL image, as
    torchvision's loader makes it (grayscale, CMYK, palette and RGBA converted). A truncated
    file, a decompression bomb or anything PIL cannot read is a DataError naming ``where``.
    ``min_side``: the shorter side the image is headed for; a JPEG is then decoded by libjpeg
    at 1/2, 1/4 or 1/8 scale where that still leaves at least twice ``min_side`` (PIL's draft
    mode: most of the decode cost of a large JPEG bound for a small size disappears)."""
    from PIL import Image, UnidentifiedImageError

    # not closed: an in-memory buffer holds no file, and closing would free the pixels (a copy)
    im = open_image(data, where)
    try:
        full_size = im.size
        if min_side:
            w, h = im.size
            short = max(min(w, h), 1)
            # keep at least twice the target: the bilinear resize that follows still averages
            # over >= 2 decoded pixels per output pixel, so the result stays near a full decode
            want = 2 * min_side
            im.draft("RGB", (math.ceil(w * want / short), math.ceil(h * want / short)))
        im.load()
        out = im.convert("RGB") if im.mode != "RGB" else im
        if out.size != full_size:
            out.info["full_size"] = full_size
        return out
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {where}: {exc}") from None


def decode_rrc_flip(data: bytes, where: str, size: int, rng) -> np.ndarray:
    """``rrc-flip`` on an encoded image -> uint8 [size, size, 3]: the crop is drawn on the full
    image (its size read from the header), then only as much is decoded as the crop needs: a
    JPEG at libjpeg's 1/2, 1/4 or 1/8 scale where the crop keeps at least twice ``size`` on
    its shorter side. Otherwise (and always for other formats) it is torchvision's
    ``RandomResizedCrop`` + flip on the full decode, pixel for pixel."""
    with open_image(data, where) as head:
        w, h = head.size
    params = rrc_params(rng, h, w)
    crop_short = max(min(params[2], params[3]), 1)
    # the draft keeps the crop's shorter side >= 2 x size: decode_rgb's min_side is the image's
    min_side = math.ceil(size * min(w, h) / crop_short) if crop_short > 2 * size else None
    return finish_rrc_flip(decode_rgb(data, where, min_side=min_side), params, size, rng)


def decode_eval(data: bytes, where: str, size: int, eval_transform: str = "center-crop") -> np.ndarray:
    """Encoded bytes -> uint8 [size, size, 3] by the evaluation transform (``eval_geometry``)."""
    resize, crop = eval_geometry(size, eval_transform)
    return resize_center_crop(decode_rgb(data, where, min_side=resize), resize, crop)


def decode_part(items: Sequence[Tuple[str, bytes]], size: int, eval_transform: str, kind: str,
                split: str) -> np.ndarray:
    """The encoded images ``(where, bytes)`` of one partition -> uint8 [N, size, size, 3]; the
    first that does not decode stops with one line naming it and how many were read before."""
    out = np.empty((len(items), size, size, 3), np.uint8)
    for i, (where, data) in enumerate(items):
        try:
            out[i] = decode_eval(data, where, size, eval_transform)
        except DataError as exc:
            raise DataError(f"{kind}: {exc} ({i} image(s) of this {len(items)}-file part of the {split} split "
                            f"read before it)") from None
    return out


def find_bad_images(identity: str, groups: Sequence[Callable[[], Iterable[Tuple[str, object]]]]) -> dict:
    """``bad=skip``: every image decoded once, ``{where: reason}`` of those that do not.
    ``groups``: callables yielding ``(where, bytes or an error message)`` (a file, a row group,
    a shard), run in threads (PIL decodes without the GIL). The verdicts are cached on disk under
    ``identity`` (the data's location and its files' names, sizes and times), so the Ray workers
    that open the same spec, and reruns, do not decode everything again."""
    import contextlib
    import hashlib
    import json
    from concurrent.futures import ThreadPoolExecutor

    from engine.storage import cache_root

    cache = cache_root() / "bad-images"
    cache_file = cache / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.json"
    verdicts = None
    with contextlib.suppress(OSError, ValueError):  # no cache yet, or a damaged one: decode
        verdicts = json.loads(cache_file.read_text())
    if isinstance(verdicts, dict) and all(isinstance(v, str) for v in verdicts.values()):
        return verdicts

    def check(group) -> list:
        found = []
        for where, data in group():
            if isinstance(data, str):
                found.append((where, data))
                continue
            try:
                decode_rgb(data, where)
            except DataError as exc:
                found.append((where, str(exc)))
        return found

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        verdicts = {where: why for found in pool.map(check, groups) for where, why in found}
    try:
        from engine.artifacts import atomic_write_bytes

        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, json.dumps(verdicts, sort_keys=True).encode())
    except OSError:
        pass  # a read-only home: the verdicts are recomputed where needed
    return verdicts


class EncodedImages:
    """What the sources of encoded images of any size share: the options ``size=S`` (default:
    the first training image's shorter side, at most 224), ``eval=center-crop|resize`` and
    ``bad=fail|skip``; images made RGB and brought to S x S by the evaluation transform; the
    reference training transform for S by default; ``rrc-flip`` on the encoded original.

    A subclass calls ``_image_options`` in its constructor and provides ``_first_train_image``
    and ``_encoded_by_id`` (both ``(where, bytes)``)."""

    OPTIONS = {"size": int, "bad": str, "eval": str}
    kind: str
    encoded = True  # the images are encoded files (a source may also hold fixed-size arrays: Parquet)

    def _image_options(self, kind: str, arg: Optional[str], usage: str, size: Optional[int], bad: str,
                       eval_transform: str) -> None:
        """Check and keep the argument (``usage`` says what it should be when it is missing) and
        the options; sets ``spec`` (options in canonical order) and ``uri``."""
        if not arg:
            raise ConfigError(f"{kind} source needs {usage}")
        if size is not None and not 1 <= size <= 4096:
            raise ConfigError(f"{kind}: size={size} must be between 1 and 4096")
        if bad not in BAD_IMAGES:
            raise ConfigError(f"{kind}: bad={bad!r}: expected one of {', '.join(BAD_IMAGES)}")
        self.kind, self._size, self.bad = kind, size, bad
        self.eval_transform = check_eval_transform(eval_transform)
        self.skipped: list = []  # (where, reason) of the images bad=skip left out
        opts = (f",size={size}" if size else "") + (f",bad={bad}" if bad != "fail" else "") \
            + (f",eval={eval_transform}" if eval_transform != "center-crop" else "")
        self.spec, self.uri = f"{kind}{opts}:{arg}", arg

    def _first_train_image(self) -> Tuple[str, bytes]:
        raise NotImplementedError

    def _encoded_by_id(self, sample_ids: np.ndarray) -> list:
        """``(where, bytes)`` of the training rows ``sample_ids``, in their order."""
        raise NotImplementedError

    @property
    def size(self) -> int:
        if self._size is None:
            where, data = self._first_train_image()
            w, h = decode_rgb(data, where).size
            self._size = min(DEFAULT_MAX_SIZE, w, h)
        return self._size

    def image_info(self, num_classes: int, class_names=None) -> DataInfo:
        return DataInfo(self.spec, num_classes, (self.size, self.size, 3), (GENERIC_MEAN,) * 3, (GENERIC_STD,) * 3,
                        None if class_names is None else tuple(class_names),
                        train_transform=default_train_transform(self.size), eval_transform=self.eval_transform)

    def rows_of(self, split, ids):
        """Training rows: only the images of ``ids`` are read and decoded."""
        from engine.data.base import ArraySplit

        if split != "train" or not self.encoded:
            return super().rows_of(split, ids)
        ids = np.asarray(ids, dtype=np.int64)
        known, labels = self.ids_and_labels("train")
        label_of = dict(zip(known.tolist(), labels.tolist()))
        absent = [int(i) for i in ids if int(i) not in label_of]
        if absent:
            raise DataError(f"{len(absent)} sample_id(s) are absent from the data, e.g. {absent[:5]}")
        images = np.empty((len(ids), self.size, self.size, 3), np.uint8)
        for k, (where, data) in enumerate(self._encoded_by_id(ids)):
            images[k] = decode_eval(data, where, self.size, self.eval_transform)
        return ArraySplit(ids, images, np.array([label_of[int(i)] for i in ids], dtype=np.int64))

    def augment(self, images, sample_ids, transform, seed, epoch):
        """``rrc-flip`` crops the original: the encoded images of ``sample_ids`` are decoded
        again (``decode_rrc_flip``); the other transforms work on ``images`` (the evaluation
        transform's output)."""
        if transform != "rrc-flip" or not self.encoded:
            return super().augment(images, sample_ids, transform, seed, epoch)
        ids = np.asarray(sample_ids, dtype=np.int64)
        out = np.empty((len(ids), self.size, self.size, 3), np.uint8)
        for i, (sid, (where, data)) in enumerate(zip(ids, self._encoded_by_id(ids))):
            out[i] = decode_rrc_flip(data, where, self.size, sample_rng(seed, epoch, int(sid)))
        return out
