"""Quantization of the denoiser: ModelOpt fake quantization with per-layer plans, the sensitivity
measurement and the size-budget search of ``--precision mixed``, and the ``quantize`` stage."""
