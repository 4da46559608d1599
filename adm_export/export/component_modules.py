"""Export wrappers of the non-denoiser components: each takes and returns plain tensors.

Every wrapper computes exactly what the family's pipeline computes from that component (the same
call, the same post-processing such as AudioLDM's L2 normalisation), so an ONNX graph traced from
it can replace the pipeline's code in the torch-free runtime. Imported lazily by
:mod:`adm_export.export.components` only (this module imports torch at the top).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class ClapTextEmbeds(nn.Module):
    """AudioLDM: ``ClapTextModelWithProjection`` -> ``text_embeds``, L2-normalised (``_encode_prompt``)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask):
        embeds = self.text_encoder(input_ids, attention_mask=attention_mask).text_embeds
        return F.normalize(embeds, dim=-1)


class ClapTextFeatures(nn.Module):
    """AudioLDM2: ``ClapModel.get_text_features`` (projected and normalised by CLAP itself)."""

    def __init__(self, clap):
        super().__init__()
        self.clap = clap

    def forward(self, input_ids, attention_mask):
        out = self.clap.get_text_features(input_ids, attention_mask=attention_mask)
        # transformers 5 may return an output object; the pipeline takes its pooler_output then.
        return getattr(out, "pooler_output", out)


class TextEncoderStates(nn.Module):
    """T5 (AudioLDM2's second encoder, TANGO): the encoder's last hidden states, padding masked."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask):
        return self.text_encoder(input_ids, attention_mask=attention_mask)[0]


class TokenStates(nn.Module):
    """Make-An-Audio: the CLAP text tower on the padded tokens, without a mask (as the original)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)


class Projection(nn.Module):
    """AudioLDM2's ``AudioLDM2ProjectionModel``: both streams projected, SOS/EOS added, concatenated."""

    def __init__(self, projection_model):
        super().__init__()
        self.projection_model = projection_model

    def forward(self, hidden_states, hidden_states_1, attention_mask, attention_mask_1):
        out = self.projection_model(hidden_states=hidden_states, hidden_states_1=hidden_states_1,
                                    attention_mask=attention_mask, attention_mask_1=attention_mask_1)
        return out.hidden_states, out.attention_mask


class LanguageModelStep(nn.Module):
    """One step of AudioLDM2's GPT-2 loop: the last position's final hidden state.

    The pipeline's loop (and the adapter's equivalent, ``models.audioldm2.generate_hidden_states``)
    runs GPT-2 on the whole sequence each step and appends ``hidden_states[-1][:, -1:]``; the
    runtime runs that loop in numpy around this graph (no KV cache, as the adapter's loop).
    """

    def __init__(self, language_model):
        super().__init__()
        self.language_model = language_model

    def forward(self, inputs_embeds, attention_mask):
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  output_hidden_states=True, return_dict=True)
        return out.hidden_states[-1][:, -1:, :]


class VaeDecoder(nn.Module):
    """``vae.decode(latents).sample`` laid out as the vocoder's input ``(batch, mel frames, mel bins)``.

    Args:
        vae: diffusers ``AutoencoderKL``.
        time_last: The latent (and the decoded mel) has time on the last axis (Make-An-Audio:
            mel x time); otherwise time is the height axis (AudioLDM, AudioLDM2, TANGO).
    """

    def __init__(self, vae, time_last: bool):
        super().__init__()
        self.vae = vae
        self.time_last = time_last

    def forward(self, latents):
        mel = self.vae.decode(latents).sample.squeeze(1)
        return mel.transpose(1, 2) if self.time_last else mel


class Vocoder(nn.Module):
    """Any vocoder module the pipeline calls with a mel ``(batch, frames, mel bins)``: waveform ``(batch, samples)``."""

    def __init__(self, vocoder):
        super().__init__()
        self.vocoder = vocoder

    def forward(self, mel):
        wav = self.vocoder(mel)
        return wav.reshape(wav.shape[0], -1) if wav.dim() != 2 else wav
