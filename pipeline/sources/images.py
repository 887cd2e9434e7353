"""``images:``: a folder of image files, resized and normalised into one model input."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError, fail
from pipeline.graph.layout import Layout
from pipeline.sources.checks import Batch, Specs
from pipeline.sources.kind import Reading, SourceKind, checked_path, hash_files, shard_range
from pipeline.sources.spec import DataSource, ImagesSource

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


def image_files(folder: str) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _images(src: ImagesSource, batch_size: int, input_name: str) -> Iterator[Batch]:
    from PIL import Image

    files = image_files(src.dir)
    if not files:
        fail(DataError, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {src.dir}.")
    h, w = src.size
    mean = np.asarray(src.mean, np.float32)
    std = np.asarray(src.std, np.float32)
    for start in range(0, len(files), batch_size):
        chunk = []
        for f in files[start : start + batch_size]:
            img = Image.open(f).convert("L" if src.channels == "L" else "RGB").resize((w, h), Image.Resampling.BILINEAR)
            a = np.asarray(img, np.float32)
            a = a[:, :, None] if a.ndim == 2 else a
            if src.channels == "BGR":
                a = a[:, :, ::-1]
            a = (a / src.scale - mean) / std
            chunk.append(a.transpose(2, 0, 1) if src.layout == "NCHW" else a)
        yield {input_name: np.ascontiguousarray(np.stack(chunk), dtype=np.float32)}


class Images(SourceKind):
    name = "images"

    def check(self, src: DataSource, base: Path, path: str) -> None:
        images = src.images
        assert images is not None
        images.dir = checked_path(base, images.dir, f"{path}.images.dir", kind="folder")
        if len(images.size) != 2:
            fail(ConfigError, f"{path}.images.size: expected [height, width], got {images.size}.")
        channels = 1 if images.channels == "L" else 3
        for key in ("mean", "std"):
            if len(getattr(images, key)) != channels:
                fail(
                    ConfigError,
                    f"{path}.images.{key}: expected {channels} values for channels {images.channels}, "
                    f"got {getattr(images, key)}.",
                )

    def read(
        self, src: DataSource, batch_size: int, layout: Layout, specs: Specs, dirs: list[Path], what: str
    ) -> Iterator[Batch]:
        assert src.images is not None
        return _images(src.images, batch_size, src.images.input or next(iter(specs)))

    def digest(self, h: Any, src: DataSource, dirs: list[Path]) -> None:
        assert src.images is not None
        h.update(repr(src.images).encode())
        hash_files(h, image_files(src.images.dir))

    def shard(self, src: DataSource, index: int, num: int, reading: Reading, what: str) -> Iterator[Batch]:
        assert src.images is not None
        files = image_files(src.images.dir)
        files = files[: src.limit] if src.limit else files
        lo, hi = shard_range(len(files), index, num)
        if lo == hi:
            return
        with tempfile.TemporaryDirectory(prefix="int8pipe-shard-images-") as tmp:
            for f in files[lo:hi]:  # a folder of this shard's files: decoded by the same code, in the same order
                (Path(tmp) / f.name).symlink_to(f.resolve())
            sub = dataclasses.replace(src, images=dataclasses.replace(src.images, dir=tmp), limit=None)
            yield from reading.batches(sub, what)

    def uri(self, src: DataSource) -> str:
        assert src.images is not None
        return src.images.dir
