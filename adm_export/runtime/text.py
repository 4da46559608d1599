"""Prompt -> the denoiser's conditioning inputs, per family, with ``tokenizers`` and ONNX Runtime.

Each conditioner reproduces its pipeline's ``encode_prompt`` for one prompt (the adapters encode
prompts one by one too, so a clip depends only on its own prompt): the same tokenization
(padding, truncation, the unconditional prompt ``""`` and the length it is padded to), the same
component calls, and the same fixed-length padding of text states with a zero mask that the
exported denoiser takes (``models.conditioning``). It returns ``(cond, uncond)``: dicts of
denoiser input name -> array with a batch of 1; ``uncond`` is None without guidance.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from adm_export.errors import InvalidInputError


class TextTokenizer:
    """A ``tokenizer.json`` called as transformers calls it: ``truncation=True``, optional padding.

    Args:
        path: ``tokenizer.json``.
        model_max_length: The tokenizer's ``model_max_length``.
        pad_id: Id of the padding token.
    """

    def __init__(self, path: str | Path, model_max_length: int, pad_id: int):
        import tokenizers

        self._source = Path(path).read_text()
        self._cls = tokenizers.Tokenizer
        self.model_max_length = int(model_max_length)
        self.pad_id = int(pad_id)
        self._by_length: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _tokenizer(self, max_length: int):
        with self._lock:
            tok = self._by_length.get(max_length)
            if tok is None:
                tok = self._cls.from_str(self._source)
                tok.no_padding()
                # transformers' truncation=True: longest_first, right side, special tokens kept.
                tok.enable_truncation(max_length=max_length)
                self._by_length[max_length] = tok
            return tok

    def count(self, text: str) -> int:
        """Tokens of ``text`` with special tokens, untruncated."""
        tok = self._tokenizer(1 << 20)
        return len(tok.encode(text).ids)

    def __call__(self, text: str, max_length: int | None = None, pad_to: int | None = None):
        """``(input_ids, attention_mask)``, int64, batch of 1, truncated at ``max_length`` and padded to ``pad_to``."""
        ids = self._tokenizer(int(max_length or self.model_max_length)).encode(text).ids
        n = len(ids)
        length = max(n, pad_to or 0)
        out = np.full((1, length), self.pad_id, dtype=np.int64)
        out[0, :n] = ids
        mask = np.zeros((1, length), dtype=np.int64)
        mask[0, :n] = 1
        return out, mask


def _pad(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad axis 1 to ``length`` (text states and masks alike)."""
    if x.shape[1] == length:
        return x
    width = [(0, 0)] * x.ndim
    width[1] = (0, length - x.shape[1])
    return np.pad(x, width)


class Conditioner:
    """Base: loads the family's tokenizers and components from the bundle."""

    components: tuple[str, ...] = ()

    def __init__(self, folder: Path, config: dict, make_model):
        self.folder = Path(folder)
        self.config = config
        text = config["text"]
        self.tokenizers = {name: TextTokenizer(self.folder / t["file"], t["model_max_length"], t["pad_id"])
                           for name, t in text["tokenizers"].items()}
        self.models = {name: make_model(name) for name in self.components}
        self._uncond: dict[Any, dict] = {}
        self._lock = threading.Lock()

    def check(self, prompt: str) -> None:
        """Raise :class:`InvalidInputError` if the prompt cannot be encoded (default: always fine)."""

    def __call__(self, prompt: str, guidance: bool) -> tuple[dict, dict | None]:
        raise NotImplementedError

    def _cached_uncond(self, key, make) -> dict:
        with self._lock:
            if key not in self._uncond:
                self._uncond[key] = make()
            return self._uncond[key]


class AudioLDMConditioner(Conditioner):
    """CLAP text model + projection, L2-normalised, as ``class_labels`` (AudioLDMPipeline._encode_prompt)."""

    components = ("text_encoder",)

    def _embed(self, text: str, length: int) -> dict:
        ids, mask = self.tokenizers["tokenizer"](text, max_length=length, pad_to=length)
        return {"class_labels": self.models["text_encoder"](input_ids=ids, attention_mask=mask)[0]}

    def __call__(self, prompt, guidance):
        tok = self.tokenizers["tokenizer"]
        cond = self._embed(prompt, tok.model_max_length)
        if not guidance:
            return cond, None
        # The pipeline pads "" to prompt_embeds.shape[1], i.e. the embedding width (a quirk kept
        # for exactness; the mask makes the length immaterial up to rounding).
        n = int(self.config["text"]["uncond_max_length"])
        return cond, self._cached_uncond(n, lambda: self._embed("", n))


class AudioLDM2Conditioner(Conditioner):
    """CLAP features + FLAN-T5 states -> projection -> GPT-2 loop (AudioLDM2Pipeline.encode_prompt).

    The U-Net gets the generated GPT-2 states and the T5 states padded to ``text_len``. The
    unconditional T5 input is ``""`` padded to the conditional prompt's T5 length, as the pipeline
    does, so it is cached per length.
    """

    components = ("text_encoder", "text_encoder_2", "projection", "language_model")

    def check(self, prompt):
        t5 = self.tokenizers["tokenizer_2"]
        n = min(t5.count(prompt), t5.model_max_length)
        if n > int(self.config["text"]["text_len"]):
            raise InvalidInputError(f"prompt {prompt[:40]!r}... is {n} T5 tokens, more than the model's fixed "
                                    f"{self.config['text']['text_len']}; shorten it")

    def _encode(self, text: str, t5_pad: int | None) -> tuple[dict, int]:
        clap_tok, t5_tok = self.tokenizers["tokenizer"], self.tokenizers["tokenizer_2"]
        ids, mask = clap_tok(text, pad_to=clap_tok.model_max_length)
        clap = self.models["text_encoder"](input_ids=ids, attention_mask=mask)[0][:, None, :]
        ids2, mask2 = t5_tok(text, pad_to=t5_pad)
        t5 = self.models["text_encoder_2"](input_ids=ids2, attention_mask=mask2)[0]
        embeds, pmask = self.models["projection"](hidden_states=clap, hidden_states_1=t5,
                                                  attention_mask=np.ones((1, 1), np.int64), attention_mask_1=mask2)
        n = int(self.config["text"]["generated_len"])
        lm = self.models["language_model"]
        pmask = pmask.astype(np.int64)
        for _ in range(n):  # the pipeline's generation loop: whole sequence each step, no cache
            nxt = lm(inputs_embeds=embeds, attention_mask=pmask)[0]
            embeds = np.concatenate([embeds, nxt.astype(embeds.dtype)], axis=1)
            pmask = np.concatenate([pmask, np.ones((1, 1), np.int64)], axis=1)
        text_len = int(self.config["text"]["text_len"])
        if t5.shape[1] > text_len:
            raise InvalidInputError(f"prompt {text[:40]!r}... is {t5.shape[1]} T5 tokens, more than the model's "
                                    f"fixed {text_len}; shorten it")
        return {
            "encoder_hidden_states": embeds[:, -n:, :],
            "encoder_hidden_states_1": _pad(t5, text_len),
            "encoder_attention_mask_1": _pad(mask2.astype(np.float32), text_len),
        }, t5.shape[1]

    def __call__(self, prompt, guidance):
        cond, length = self._encode(prompt, None)
        if not guidance:
            return cond, None
        return cond, self._cached_uncond(length, lambda: self._encode("", length)[0])


class TangoConditioner(Conditioner):
    """FLAN-T5 states and mask, padded to ``text_len`` (TangoPipeline.encode_prompt)."""

    components = ("text_encoder",)

    def _encode(self, text: str) -> dict:
        n = int(self.config["text"]["text_len"])
        ids, mask = self.tokenizers["tokenizer"](text, max_length=n, pad_to=n)
        states = self.models["text_encoder"](input_ids=ids, attention_mask=mask)[0]
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask.astype(np.float32)}

    def __call__(self, prompt, guidance):
        return self._encode(prompt), (self._cached_uncond("", lambda: self._encode("")) if guidance else None)


class MakeAnAudioConditioner(Conditioner):
    """BERT + CLAP projection on 77 padded tokens, no mask (MakeAnAudioPipeline.encode_prompt)."""

    components = ("text_encoder",)

    def _encode(self, text: str) -> dict:
        n = int(self.config["text"]["text_len"])  # 77, whatever the BERT tokenizer's own maximum
        ids, _ = self.tokenizers["tokenizer"](text, max_length=n, pad_to=n)
        return {"context": self.models["text_encoder"](input_ids=ids)[0]}

    def __call__(self, prompt, guidance):
        return self._encode(prompt), (self._cached_uncond("", lambda: self._encode("")) if guidance else None)


CONDITIONERS = {"audioldm": AudioLDMConditioner, "audioldm2": AudioLDM2Conditioner, "tango": TangoConditioner,
                "make_an_audio": MakeAnAudioConditioner}
