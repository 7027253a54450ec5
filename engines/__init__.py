"""Engines: ONNX Runtime sessions and TensorRT plans behind one interface (torch-free)."""
