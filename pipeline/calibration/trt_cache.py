"""TensorRT's calibration cache text format, both ways.

    TRT-<version>-<Algorithm>
    <tensor name>: <8 hex digits>      big-endian IEEE-754 float32 bits of scale = amax / 127
    <tensor name>: 0                   (a tensor without a range)

``version`` is major*1000 + minor*100 + patch before TensorRT 10 (8.6.1 -> 8601) and
major*10000 + minor*100 + patch from 10 on (10.14.1 -> 101401).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.calibration.methods import METHODS
from pipeline.errors import CalibrationError, fail

# the cache header's algorithm per calibration method (methods.METHODS says why)
ALGORITHMS = {name: m.trt_algorithm for name, m in METHODS.items()}


def encode_version(version: str) -> int:
    try:
        parts = [int(p) for p in version.split(".")[:3]]
    except ValueError:
        fail(CalibrationError, f"TensorRT version {version!r}: expected MAJOR.MINOR.PATCH, e.g. 10.14.1.")
    major, minor, patch = (parts + [0, 0])[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def decode_version(number: int) -> str:
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return float(struct.unpack(">f", bytes.fromhex(text))[0])


@dataclass
class CacheFile:
    version: str  # dotted, e.g. "10.14.1"
    algorithm: str
    scales: dict[str, float | None] = field(default_factory=dict)  # None: no range

    @property
    def amax(self) -> dict[str, float | None]:
        return {k: (None if s is None else s * 127.0) for k, s in self.scales.items()}

    def text(self) -> str:
        lines = [f"TRT-{encode_version(self.version)}-{self.algorithm}"]
        for name, scale in self.scales.items():
            lines.append(f"{name}: {scale_to_hex(scale) if scale else '0'}")
        return "\n".join(lines) + "\n"


def from_amax(amax: dict[str, float], version: str, algorithm: str) -> CacheFile:
    """A cache for ``amax`` per tensor; ``algorithm`` as in the header (see ALGORITHMS)."""
    scales: dict[str, float | None] = {k: (v / 127.0 if v > 0 else None) for k, v in amax.items()}
    return CacheFile(version=version, algorithm=algorithm, scales=scales)


MAX_LINE = 1 << 16  # characters: a cache line is a tensor name and 8 hex digits
SHOWN = 80  # characters of an offending line an error message quotes


def _shown(line: str) -> str:
    """``line`` quoted for an error message, cut to its first SHOWN characters."""
    if len(line) <= SHOWN:
        return repr(line)
    return f"{line[:SHOWN]!r}... ({len(line):,} characters)"


def _numbered(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if line:
            yield n, line


def _file_lines(p: Path) -> Iterator[str]:
    """The lines of ``p``, read one at a time; a line longer than MAX_LINE is refused, not loaded."""
    n = 0
    try:
        with open(p, encoding="utf-8") as f:
            while True:
                line = f.readline(MAX_LINE + 1)
                if not line:
                    return
                n += 1
                if len(line) > MAX_LINE:
                    fail(
                        CalibrationError,
                        f"{p}: line {n} {_shown(line)} is longer than {MAX_LINE:,} characters: "
                        "not a TensorRT calibration cache (one 'tensor: hex' per line).",
                    )
                yield line
    except UnicodeDecodeError:
        fail(
            CalibrationError,
            f"{p}: not UTF-8 text near line {n + 1}: not a text TensorRT calibration cache "
            "(is it a serialized engine?).",
        )


def _entries(lines: Iterator[tuple[int, str]], source: str) -> Iterator[tuple[str, float | None]]:
    for n, line in lines:
        name, sep, value = line.rpartition(":")  # tensor names may themselves contain ':'
        value = value.strip()
        if not sep or not name:
            fail(CalibrationError, f"{source}: line {n} {_shown(line)} is not 'tensor: hex'.")
        if value == "0":
            yield name, None
            continue
        try:
            yield name, hex_to_scale(value.rjust(8, "0"))
        except ValueError:
            fail(CalibrationError, f"{source}: line {n}: {_shown(value)} is not 8 hex digits.")


def stream(lines: Iterable[str], source: str = "cache") -> tuple[CacheFile, Iterator[tuple[str, float | None]]]:
    """The header of a cache (scales left empty) and an iterator over its (tensor, scale) entries.

    Lines are consumed as the entries are, so a cache of any size is read in constant memory;
    a malformed line raises when the iterator reaches it.
    """
    numbered = _numbered(lines)
    first = next(numbered, None)
    if first is None:
        fail(CalibrationError, f"{source}: empty calibration cache.")
    head = first[1].split("-", 2)
    if len(head) != 3 or head[0] != "TRT" or not head[1].isdigit():
        fail(
            CalibrationError,
            f"{source}: first line {_shown(first[1])} is not a TensorRT cache header (TRT-<version>-<Algorithm>).",
        )
    return CacheFile(version=decode_version(int(head[1])), algorithm=head[2]), _entries(numbered, source)


def parse(text: str, source: str = "cache") -> CacheFile:
    cache, entries = stream(text.splitlines(), source)
    cache.scales.update(entries)
    return cache


def open_cache(path: str | Path) -> tuple[CacheFile, Iterator[tuple[str, float | None]]]:
    """:func:`stream` over the file at ``path``, read line by line."""
    p = Path(path)
    if not p.is_file():
        fail(CalibrationError, f"calibration cache not found: {p}.")
    return stream(_file_lines(p), str(p))


def read(path: str | Path) -> CacheFile:
    cache, entries = open_cache(path)
    cache.scales.update(entries)
    return cache


def portability_warning(cache_version: str, target_version: str) -> str | None:
    """TensorRT's documented rule for reusing a cache across releases, as a warning text."""
    if cache_version.split(".")[:2] == target_version.split(".")[:2]:
        return None
    return (
        f"this cache was written for TensorRT {cache_version}, the target is {target_version}: TensorRT "
        "documents the calibration cache as, in general, not portable across TensorRT releases; "
        "recalibrate with the target release or check accuracy with the rebuilt engine."
    )
