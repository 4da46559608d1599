"""Quantization (ModelOpt) and ONNX export of the denoiser."""
