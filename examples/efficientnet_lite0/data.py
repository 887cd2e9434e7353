"""Calibration crops from the real photographs that ship inside scikit-image (skimage.data).

Each sample is a random square crop (seeded) of one of the colour photos, resized to 224x224 and
normalised as EfficientNet-Lite expects: (pixel - 127) / 128, NCHW float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
    "cat",
)


def _photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        img = np.asarray(fn())
        if img.ndim == 3 and img.shape[2] >= 3:
            out.append(img[:, :, :3])
    return out


def crops(n: int = 256, batch_size: int = 32, size: int = 224, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    from PIL import Image

    photos = _photos()
    rng = np.random.default_rng(seed)
    batch: list[np.ndarray] = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BILINEAR)
        arr = (np.asarray(crop, np.float32) - 127.0) / 128.0
        batch.append(arr.transpose(2, 0, 1))
        if len(batch) == batch_size:
            yield {"input": np.stack(batch)}
            batch = []
    if batch:
        yield {"input": np.stack(batch)}
