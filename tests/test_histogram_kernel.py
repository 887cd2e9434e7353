"""The compiled |x| histogram kernel against hand-counted answers and against the numpy path.

Both paths must agree count for count: the exactness tests of the methods run through whichever
the install has, and the benchmark's speed relies on the compiled one giving the same ranges.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.calibration import histogram
from pipeline.calibration.histogram import add_abs_histogram

compiled_only = pytest.mark.skipif(
    histogram.KERNEL != "compiled", reason="the C extension was not built (no C compiler at install time)"
)


def both(x: np.ndarray, inv_width: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    fast, slow = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    add_abs_histogram(x.copy(), inv_width, fast, compiled=True)
    add_abs_histogram(x.copy(), inv_width, slow, compiled=False)
    return fast, slow


def test_ci_builds_the_kernel() -> None:
    # .ci/run sets this: there a missing kernel is a broken build, not a machine without a compiler
    if os.environ.get("INT8PIPE_REQUIRE_COMPILED_KERNEL") != "1":
        pytest.skip("INT8PIPE_REQUIRE_COMPILED_KERNEL is not set")
    assert histogram.KERNEL == "compiled"


@pytest.mark.parametrize("compiled", [True, False])
def test_hand_counted_bins(compiled: bool) -> None:
    # width 0.5 (inv_width 2), 4 bins over [0, 2): edges 0, 0.5, 1, 1.5, 2
    x = np.array([0.0, -0.0, 0.49, 0.5, -0.75, 1.0, 1.49, 1.5, 1.99, 2.0, 100.0, -3.0], np.float32)
    counts = np.zeros(4, np.int64)
    add_abs_histogram(x, 2.0, counts, compiled=compiled)
    # bin 0: 0, -0, 0.49 | bin 1: 0.5, -0.75 | bin 2: 1.0, 1.49 | bin 3: 1.5, 1.99 and the top edge
    # 2.0 plus the values past it (100, -3), which TensorRT's histogram keeps in its last bin
    assert counts.tolist() == [3, 2, 2, 5]


@pytest.mark.parametrize("size", [5, 1000, 2048 * 16 + 3])  # plain loop, and sub-histograms with a tail
def test_compiled_equals_numpy(size: int) -> None:
    rng = np.random.default_rng(size)
    laplace = rng.laplace(0, 0.3, size).astype(np.float32)
    laplace[:: max(size // 4, 1)] *= 40  # rare large outliers
    relu = np.maximum(rng.normal(0, 1, size), 0).astype(np.float32)  # half the values in bin 0
    amax = float(np.abs(laplace).max())
    for x, top in ((laplace, amax), (relu, float(relu.max()) or 1.0), (laplace, amax * 0.3)):
        fast, slow = both(x, 2048 / top, 2048)
        np.testing.assert_array_equal(fast, slow)
        assert fast.sum() == size


def test_values_on_bin_edges_agree() -> None:
    # exact multiples of the width are where float rounding would show a difference between paths
    width = np.float32(0.1)
    x = (np.arange(2049, dtype=np.float32) * width).repeat(20)
    fast, slow = both(x, float(1 / width), 2048)
    np.testing.assert_array_equal(fast, slow)


def test_non_contiguous_and_other_dtypes_fall_back() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (64, 64)).astype(np.float32)
    inv = 256 / 5.0
    for x in (base[:, ::2], base.T):  # views the kernel cannot take: same counts as a contiguous copy
        counts, contiguous = np.zeros(256, np.int64), np.zeros(256, np.int64)
        add_abs_histogram(x, inv, counts)
        add_abs_histogram(np.ascontiguousarray(x), inv, contiguous)
        np.testing.assert_array_equal(counts, contiguous)
        assert counts.sum() == x.size
    wide = base.astype(np.float64)
    counts = np.zeros(256, np.int64)
    add_abs_histogram(wide.copy(), inv, counts)
    expected = np.bincount(np.minimum((np.abs(wide) * np.float32(inv)).astype(np.int64), 255).ravel(), minlength=256)
    np.testing.assert_array_equal(counts, expected)


@compiled_only
def test_kernel_rejects_wrong_buffers() -> None:
    from pipeline.calibration._histogram import abs_histogram

    x = np.ones(8, np.float32)
    with pytest.raises(TypeError, match="float32"):
        abs_histogram(np.ones(8, np.float64), 1.0, np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="int64"):
        abs_histogram(x, 1.0, np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="int64"):
        abs_histogram(x, 1.0, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="inv_width"):
        abs_histogram(x, 0.0, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="inv_width"):
        abs_histogram(x, float("inf"), np.zeros(4, np.int64))
    counts = np.zeros(4, np.int64)
    with pytest.raises((BufferError, ValueError, TypeError)):
        abs_histogram(x, 1.0, counts[::2])  # not contiguous
    assert counts.sum() == 0  # nothing was counted on a refused call
