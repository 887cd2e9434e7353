"""``ranges.json``: the canonical record of a calibration. Every other calibration artifact derives from it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import CalibrationError, fail

FORMAT = "int8pipe-ranges"
VERSION = 1


@dataclass
class TensorRange:
    min: float
    max: float
    amax: float  # the chosen method's symmetric threshold
    minmax_amax: float = 0.0  # max |x|, for comparison
    clipped_fraction: float = 0.0  # share of values with |x| > amax
    producer: str = ""
    method: str = ""  # which method produced amax (minmax for tensors kept out of the histogram)


@dataclass
class Ranges:
    method: str
    params: dict[str, Any]
    model_sha256: str
    data_digest: str
    num_samples: int
    environment: dict[str, Any]
    tensors: dict[str, TensorRange] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "params": self.params,
            "model_sha256": self.model_sha256,
            "data_digest": self.data_digest,
            "num_samples": self.num_samples,
            "environment": self.environment,
            "tensors": {k: vars(v) for k, v in self.tensors.items()},
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def read(cls, path: Path) -> Ranges:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            fail(CalibrationError, f"{path}: not a readable ranges.json ({exc}).")
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            fail(CalibrationError, f"{path}: not an int8pipe ranges.json v{VERSION} (format={raw.get('format')!r}).")
        try:
            tensors = {k: TensorRange(**v) for k, v in raw["tensors"].items()}
            return cls(
                method=raw["method"],
                params=raw["params"],
                model_sha256=raw["model_sha256"],
                data_digest=raw["data_digest"],
                num_samples=raw["num_samples"],
                environment=raw["environment"],
                tensors=tensors,
            )
        except (KeyError, TypeError) as exc:
            fail(CalibrationError, f"{path}: malformed ranges.json ({exc}).")

    def check_model(self, model_sha256: str, where: str) -> None:
        """Refuse ranges computed on a different model: tensor names no longer mean the same thing."""
        if self.model_sha256 != model_sha256:
            fail(
                CalibrationError,
                f"{where}: these ranges were computed on a model with SHA-256 {self.model_sha256[:12]}…, "
                f"but this model's is {model_sha256[:12]}…. Tensor names may refer to different values after "
                "any change to the model or its export; calibrate again on this model.",
            )

    def amax(self) -> dict[str, float]:
        return {k: v.amax for k, v in self.tensors.items()}
