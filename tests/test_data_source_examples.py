"""Each runnable example of docs/data-sources.md runs as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, run_pipeline

pytestmark = pytest.mark.slow  # every example runs a whole pipeline

EXAMPLES = ROOT / "examples" / "data_sources"


@pytest.mark.parametrize("name", ["npz", "npy", "python", "images", "streaming"])
def test_data_source_example(name: str, tracking_uri: str, tmp_path: Path) -> None:
    s = run_pipeline(EXAMPLES / f"{name}.yaml", tracking_uri, tmp_path)
    assert s["metrics"]["num_samples"] == {"npz": 256, "npy": 64, "python": 256, "images": 16, "streaming": 64}[name]
    assert s["metrics"]["int8_nodes"] > 0
    if name == "streaming":  # state batched on axis 1, a scalar constant: cosine, and timed at both batch sizes
        assert s["gate"] == "passed" and s["metrics"]["int8_cosine"] > 0.999
        assert {"cpu.int8.bs1.latency_p50_ms", "cpu.int8.bs4.latency_p50_ms"} <= set(s["metrics"])
    elif name != "images":
        assert s["gate"] == "passed" and "int8_top1" in s["metrics"]
    assert f"examples/data_sources/{name}.yaml" in (ROOT / "docs" / "data-sources.md").read_text()
