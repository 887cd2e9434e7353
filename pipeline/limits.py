"""Defaults that bound memory, shared by the steps and the numerics below them (no imports: a leaf)."""

# Activations alive during an inference pass over samples (calibration, bias correction, GPTQ,
# validation), in MB: steps.calibrate.memory_mb's default.
DEFAULT_MEMORY_MB = 512
