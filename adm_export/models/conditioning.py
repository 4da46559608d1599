"""Helpers shared by the cross-attention families (AudioLDM2, TANGO, Make-An-Audio).

Their denoisers attend to token sequences (T5, GPT-2, CLAP/BERT states). An engine wants static
sequence lengths (TensorRT profiles and the calibration cache have only ``batch`` and ``frames``
as dynamic axes), so every family pads its text states to a fixed length with a zero attention
mask. That is exact, not an approximation: diffusers turns the mask into a bias of -10000 on the
attention scores, so a padded key gets ``exp(-10000) == 0`` weight in float32 and float16.
"""

from __future__ import annotations

import dataclasses
import logging
import string
from typing import Any

from adm_export.models.base import DenoiserSpec

logger = logging.getLogger(__name__)

# Tokenizer lengths above this are "no limit" sentinels (transformers uses 1e30), not real limits.
_MAX_SANE_LENGTH = 4096

#: FLAN-T5 text length of the engine (AudioLDM2's second stream, TANGO). FLAN-T5 allows 512 tokens;
#: audio captions use 10-40, and every padded token costs cross-attention work (keys and values at
#: every transformer), so 128, where AudioLDM2's published code truncates the same FLAN-T5 (hard-coded
#: there). Longer prompts are truncated at this length; a tokenizer without a real limit gets it too.
DEFAULT_TEXT_LEN = 128


@dataclasses.dataclass(frozen=True)
class TextCondSpec(DenoiserSpec):
    """A :class:`DenoiserSpec` whose dummy inputs carry realistic attention masks.

    Inputs whose name contains ``mask`` get 1 for the first quarter of
    the tokens and 0 after it (a short prompt padded to the fixed length), not Gaussian noise.
    """

    def dummy_inputs(self, batch: int, frames: int, seed: int = 0) -> dict[str, Any]:
        out = super().dummy_inputs(batch, frames, seed)
        for name, value in out.items():
            if "mask" in name:
                mask = value.new_zeros(value.shape)
                mask[..., : max(1, value.shape[-1] // 4)] = 1.0
                out[name] = mask
        return out


def usable_length(tokenizer, cap: int) -> int:
    """The tokenizer's ``model_max_length``, or ``cap`` where that is a "no limit" sentinel."""
    n = int(getattr(tokenizer, "model_max_length", cap) or cap)
    return cap if n > _MAX_SANE_LENGTH else n


def pad_tokens(x, length: int, dim: int = 1):
    """Zero-pad ``x`` along ``dim`` to ``length`` (states and masks alike).

    Raises:
        ValueError: ``x`` is already longer than ``length`` (the caller truncates first).
    """
    import torch

    n = x.shape[dim]
    if n == length:
        return x
    if n > length:
        raise ValueError(f"sequence of {n} tokens is longer than the fixed length {length}")
    shape = list(x.shape)
    shape[dim] = length - n
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def timestep_rows(t, sample):
    """One float32 timestep per batch row (what the engines take), from whatever the sampler passed."""
    import torch

    t = torch.as_tensor(t, device=sample.device)
    # float32 on every path: TensorRT and ONNX Runtime both take float inputs everywhere,
    # int64 is not supported by every TensorRT layer.
    return t.float().reshape(-1).expand(sample.shape[0]).contiguous()


def call_arg(args: tuple, kwargs: dict, name: str, position: int, default=None):
    """Argument ``name`` of a call, passed by keyword or at ``position``."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    return default


def build_char_t5_tokenizer(model_max_length: int = 128):
    """A T5 (Unigram) tokenizer with one piece per printable ASCII character, built locally.

    T5's real vocabulary is a SentencePiece model that cannot be downloaded here; this one
    tokenizes every caption deterministically with the same special tokens (``<pad>`` = 0,
    ``</s>`` = 1, ``<unk>`` = 2) and the same padding side, which is what the pipelines rely on.
    """
    from transformers import T5Tokenizer

    chars = sorted(set(string.printable) - set(string.whitespace))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_char_bert_tokenizer(model_max_length: int = 77):
    """A BERT WordPiece tokenizer with one token per printable ASCII character, built locally."""
    import tempfile
    from pathlib import Path

    from transformers import BertTokenizer

    chars = sorted(set(string.printable) - set(string.whitespace))
    # WordPiece splits a word into a first piece and "##" continuations: both sets are needed.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n")
        return BertTokenizer(str(path), do_lower_case=True, model_max_length=model_max_length)
