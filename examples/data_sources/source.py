"""A python: data source: any function that yields {input_name: ndarray} batches (plus "labels")."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def digit_batches(path: str, batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
    with np.load(Path(__file__).parent / path) as z:
        arrays = {k: z[k] for k in z.files}
    for start in range(0, len(arrays["input"]), batch_size):
        yield {k: v[start : start + batch_size] for k, v in arrays.items()}
