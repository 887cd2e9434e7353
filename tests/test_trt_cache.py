"""TensorRT calibration cache format: known lines decoded by hand, headers, round trips, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.calibration import flatbuffers_table, trt_cache
from pipeline.errors import CalibrationError
from pipeline.orchestration.cli import main


def by_hand(hex8: str) -> float:
    """IEEE-754 single precision from its 8 hex digits, without struct."""
    bits = int(hex8, 16)
    sign = -1.0 if bits >> 31 else 1.0
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    return sign * (1 + mantissa / 2**23) * 2.0 ** (exponent - 127)


def test_known_line_decodes_to_hand_computed_scale() -> None:
    cache = trt_cache.parse("TRT-8601-EntropyCalibration2\ninput: 3c010a14\n")
    scale = cache.scales["input"]
    assert scale == pytest.approx(by_hand("3c010a14"), rel=0, abs=0)
    assert scale == pytest.approx(0.0078759, abs=1e-7)  # 1.00812006 * 2**-7
    assert cache.amax["input"] == pytest.approx(scale * 127)


@pytest.mark.parametrize(
    ("header", "version", "algorithm"),
    [
        ("TRT-8601-EntropyCalibration2", "8.6.1", "EntropyCalibration2"),
        ("TRT-7201-EntropyCalibration2", "7.2.1", "EntropyCalibration2"),
        ("TRT-101401-EntropyCalibration2", "10.14.1", "EntropyCalibration2"),
        ("TRT-100300-MinMaxCalibration", "10.3.0", "MinMaxCalibration"),
    ],
)
def test_headers(header: str, version: str, algorithm: str) -> None:
    cache = trt_cache.parse(header + "\nx: 3f800000\n")
    assert (cache.version, cache.algorithm) == (version, algorithm)
    assert trt_cache.encode_version(version) == int(header.split("-")[1])
    assert cache.text().splitlines()[0] == header


def test_no_range_lines_and_names_with_colons() -> None:
    cache = trt_cache.parse(
        "TRT-8601-EntropyCalibration2\nimport/input:0: 3f800000\n(Unnamed Layer* 3) [Constant]_output: 0\n"
    )
    assert cache.scales == {"import/input:0": 1.0, "(Unnamed Layer* 3) [Constant]_output": None}
    assert "(Unnamed Layer* 3) [Constant]_output: 0" in cache.text()


def test_round_trip_is_bit_exact() -> None:
    amax = {"a": 1.0, "b": 6.0270357, "c": 0.0}
    cache = trt_cache.from_amax(amax, "10.14.1", trt_cache.ALGORITHMS["entropy"])
    again = trt_cache.parse(cache.text())
    assert again.version == "10.14.1" and again.algorithm == "EntropyCalibration2"
    assert again.scales["a"] == pytest.approx(1.0 / 127, rel=1e-7)
    assert again.scales["c"] is None
    assert again.text() == cache.text()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello\n",
        "TRT-xx-Entropy\n",
        "TRT-8601-EntropyCalibration2\nbad line\n",
        "TRT-8601-EntropyCalibration2\nx: zzzz\n",
    ],
)
def test_malformed_caches_are_refused(text: str) -> None:
    with pytest.raises(CalibrationError):
        trt_cache.parse(text)


def test_version_mismatch_warning_follows_tensorrt_rule() -> None:
    assert trt_cache.portability_warning("10.14.1", "10.14.3") is None
    warning = trt_cache.portability_warning("8.6.1", "10.14.1")
    assert warning is not None and "not portable across TensorRT releases" in warning


def test_flatbuffers_table_round_trip(tmp_path: Path) -> None:
    amax = {"x": 1.5, "conv_out": 0.123456789}
    path = tmp_path / "calibration.flatbuffers"
    flatbuffers_table.write(amax, path)
    assert flatbuffers_table.read(path) == amax


def test_cache_show_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "calibration.cache"
    path.write_text("TRT-100300-MinMaxCalibration\ninput: 3c010a14\nfree: 0\n")
    assert main(["cache", "show", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "10.3.0" and out["algorithm"] == "MinMaxCalibration"
    assert out["tensors"]["input"]["amax"] == pytest.approx(by_hand("3c010a14") * 127)
    assert out["tensors"]["free"] == {"scale": None, "amax": None}
    assert main(["cache", "show", str(path)]) == 0
    assert "MinMaxCalibration" in capsys.readouterr().out
    assert main(["cache", "show", str(tmp_path / "missing.cache")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cache_show_of_an_unknown_run_says_what_to_give(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.orchestration.cli import main

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["cache", "show", "0" * 32, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"cannot fetch runs:/{'0' * 32}/calibration/calibration.cache" in err and "Give a cache file" in err
