"""Decode + evaluation transform to 224x224, in images/s on one CPU core.

    .venv/bin/python bench/decode.py [--n 300] [--repeat 3]

Three ways over the same generated JPEGs (quality 90, smooth content with noise, as photos
are): Winnow's (``engine.data.images.decode_rgb`` with PIL's draft mode + ``resize_center_crop``),
a plain PIL loop (full decode, ``convert("RGB")``, torchvision's ``Resize(256)`` +
``CenterCrop(224)`` on the PIL image), and ``torchvision.io.decode_jpeg`` + the same transform
on uint8 tensors. Two image sizes: ImageNet's typical 500x375, and 1024x768 (where libjpeg's
reduced-scale decode applies). The time is also split into decode and resize+crop.
One thread everywhere (torch and PIL are single-threaded here): the figure is per core.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def jpegs(n: int, h: int, w: int) -> list[bytes]:
    from PIL import Image

    from tests.imagenet_tree import _smooth

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(_smooth(rng, h, w)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(fn, data: list[bytes], repeat: int) -> float:
    fn(data[0])  # warm up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for d in data:
            fn(d)
        best = min(best, time.perf_counter() - t0)
    return len(data) / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)

    import torch
    from PIL import Image
    from torchvision import io as tvio
    from torchvision import transforms
    from torchvision.transforms.v2 import functional as F2

    from engine.data.images import decode_rgb
    from engine.data.transforms import eval_geometry, resize_center_crop

    torch.set_num_threads(1)
    resize, crop = eval_geometry(224)
    tv_pil = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])

    def winnow(d):
        return resize_center_crop(decode_rgb(d, "bench", min_side=resize), resize, crop)

    def winnow_decode_only(d):
        return decode_rgb(d, "bench", min_side=resize)

    def pil_loop(d):
        with Image.open(io.BytesIO(d)) as im:
            return np.asarray(tv_pil(im.convert("RGB")))

    def pil_decode_only(d):
        with Image.open(io.BytesIO(d)) as im:
            return im.convert("RGB")

    def tv_decode(d):
        return tvio.decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)

    def tv_full(d):
        x = tv_decode(d)
        return F2.center_crop(F2.resize(x, [resize], antialias=True), [crop])

    print(f"# decode + eval transform to {crop}x{crop} (resize {resize}), images/s on one core; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}, Pillow {Image.__version__}; n={a.n}, best of {a.repeat}")
    print("| images | Winnow (draft + PIL resize) | its decode alone | plain PIL loop | PIL decode alone "
          "| torchvision.io.decode_jpeg + v2 resize | decode_jpeg alone |")
    print("|---|---|---|---|---|---|---|")
    for h, w in ((375, 500), (768, 1024)):
        data = jpegs(a.n, h, w)
        kb = sum(map(len, data)) / len(data) / 1024
        cells = [rate(f, data, a.repeat) for f in (winnow, winnow_decode_only, pil_loop, pil_decode_only,
                                                   tv_full, tv_decode)]
        print(f"| {w}x{h} JPEG, {kb:.0f} KB | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
