"""Formats as data: per-layer policies and formats, quantization presets, serving targets' capabilities."""
