"""Frames for the PP-OCRv4 text detector: photos that ship inside scikit-image with lines of English
words written on them, normalised as PaddleOCR feeds its DB detectors.

Each frame is a random crop of one of the photos (the astronaut, the rocket, coffee, coins, the scanned
page, ...) resized to ``size`` x ``size``, with 3-8 lines of 1-4 words (from the Python language
reference text the standard library ships, ``pydoc_data.topics``) in Pillow's built-in TrueType font at
14-43 px, dark or light by the background. Then BGR channel order (as OpenCV reads), scaled to [0, 1],
ImageNet mean and std, NCHW float32.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

PHOTOS = (
    "page", "text", "logo", "coins", "camera", "rocket", "astronaut", "coffee", "chelsea", "brick",
    "immunohistochemistry", "clock", "stereo_motorcycle", "hubble_deep_field",
)  # fmt: skip
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def photos() -> list[np.ndarray]:
    """The PHOTOS scikit-image ships (RGB uint8; a grey one as three equal channels)."""
    from skimage import data

    out = []
    for name in PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            img = np.asarray(fn())
        except Exception:  # a photo that needs a download: skip it, the rest ship offline
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(img[:, :, :3].astype(np.uint8))
    return out


def _words() -> list[str]:
    from pydoc_data.topics import topics

    return sorted({w for text in topics.values() for w in re.findall(r"[A-Za-z]{3,12}", text)})


def text_frames(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` normalised BGR NCHW frames: a crop of a bundled photo with lines of words written on it."""
    from PIL import Image, ImageDraw, ImageFont

    if not isinstance(ImageFont.load_default(size=20), ImageFont.FreeTypeFont):
        raise RuntimeError("text frames need Pillow >= 10.1 built with FreeType: pip install -U pillow")
    rng = np.random.default_rng(seed)
    images, words = photos(), _words()
    out = np.empty((n, 3, size, size), np.float32)
    for k in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(h - side + 1), rng.integers(w - side + 1)
        pil = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        draw = ImageDraw.Draw(pil)
        for _ in range(rng.integers(3, 9)):
            px = int(rng.integers(14, 44))
            line = " ".join(words[i] for i in rng.integers(len(words), size=rng.integers(1, 5)))
            tx, ty = int(rng.integers(0, size // 2)), int(rng.integers(0, size - px))
            dark = np.asarray(pil)[ty : ty + px, tx : tx + 4 * px].mean() > 128
            grey = 20 if dark else 235
            colour = tuple(int(np.clip(grey + rng.integers(-20, 21), 0, 255)) for _ in range(3))
            draw.text((tx, ty), line, fill=colour, font=ImageFont.load_default(size=px))
        frame = np.asarray(pil, np.float32) / 255.0
        out[k] = ((frame[:, :, ::-1] - MEAN) / STD).transpose(2, 0, 1)  # RGB -> BGR, as OpenCV reads
    return out


def frames(n: int = 32, size: int = 640, seed: int = 0, batch_size: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """``n`` text frames (see the module docstring) in batches of the detector's input ``x``."""
    x = text_frames(n, size, seed)
    for i in range(0, n, batch_size):
        yield {"x": x[i : i + batch_size]}
