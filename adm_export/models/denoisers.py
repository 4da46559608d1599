"""The export modules of the diffusers families: the U-Net called with the spec's inputs, positionally.

``torch.onnx.export`` and the engines call a denoiser as ``module(*inputs)`` in spec order; diffusers'
U-Nets take keyword arguments and return a dataclass. These wrappers bridge the two. Their own module
because they subclass ``torch.nn.Module``: the adapters import it when they export, so that
importing an adapter imports no torch.
"""

from __future__ import annotations

import torch


class AudioLDMDenoiser(torch.nn.Module):
    """``(sample, timestep, class_labels) -> noise``: AudioLDM's FiLM-conditioned U-Net."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, class_labels):
        return self.unet(sample, timestep, encoder_hidden_states=None, class_labels=class_labels,
                         return_dict=False)[0]


class AudioLDM2Denoiser(torch.nn.Module):
    """``(sample, timestep, encoder_hidden_states[, encoder_hidden_states_1, encoder_attention_mask_1])``.

    Args:
        unet: ``AudioLDM2UNet2DConditionModel``.
        names: The spec's input names in order (the second stream is absent when no block attends to it).
    """

    def __init__(self, unet, names: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        self.names = names

    def forward(self, *inputs):
        x = dict(zip(self.names, inputs))
        return self.unet(
            x["sample"], x["timestep"],
            encoder_hidden_states=x["encoder_hidden_states"],
            encoder_hidden_states_1=x.get("encoder_hidden_states_1"),
            encoder_attention_mask_1=x.get("encoder_attention_mask_1"),
            return_dict=False,
        )[0]


class TangoDenoiser(torch.nn.Module):
    """``(sample, timestep, encoder_hidden_states, encoder_attention_mask) -> noise``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
