"""Where models run: ONNX Runtime sessions, the machine's fingerprint, its CPU's int8 kernels."""
