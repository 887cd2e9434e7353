"""What the INT8 model does: scores, per-layer error, recovery, kernel fidelity, plots."""
