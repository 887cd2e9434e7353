"""Calibration and validation data: the source kinds a YAML can name, read as batches."""
