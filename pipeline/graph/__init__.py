"""ONNX plumbing: loading and saving models, subgraphs, tensor layouts, export from PyTorch."""
