"""Optional paraphrasing of augmented prompts by a local text2text model (``--paraphrase-model``).

A paraphrase replaces an augmented prompt only where it keeps every (aspect, value) pair the prompt
covered, so the selection's coverage survives; seed captions are left as written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from adm_export.calibration.taxonomy import Taxonomy, _normalise, _tidy
from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: Prefix given to a text2text paraphrase model (T5-style task prefix).
PARAPHRASE_PREFIX = "paraphrase: "


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _load_paraphraser(model_ref: str) -> Callable[[list[str]], list[str]]:
    """Load a transformers text2text model as a function ``texts -> paraphrases``.

    Raises:
        InvalidInputError: The model cannot be loaded (message names ``--paraphrase-model``).
    """
    local = Path(model_ref).expanduser()
    # A path-looking value that does not exist is a typo, not a hub id: fail before importing
    # transformers, which would otherwise try the network.
    if (model_ref.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
        raise InvalidInputError(
            f"--paraphrase-model {model_ref!r} is not a folder; give a local transformers text2text model "
            f"folder or a hub id, or leave the flag out")
    if local.is_dir() and not (local / "config.json").is_file():
        raise InvalidInputError(
            f"--paraphrase-model {model_ref!r} has no config.json; give a folder saved by transformers' "
            f"save_pretrained (a text2text model) or a hub id, or leave the flag out")
    try:
        import transformers  # heavy: only when paraphrasing is asked for
    except ImportError as exc:
        raise InvalidInputError(
            f"--paraphrase-model {model_ref!r} needs the 'transformers' package ({_one_line(exc)}); "
            f"install it or leave the flag out") from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_ref)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_ref)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's model choice
        raise InvalidInputError(
            f"--paraphrase-model {model_ref!r} could not be loaded as a transformers text2text model "
            f"({_one_line(exc)}); give a local folder or hub id of a seq2seq model, or leave the flag out"
        ) from exc
    model.eval()
    logger.info("paraphrase model %s loaded", model_ref)

    def paraphrase(texts: list[str]) -> list[str]:
        import torch

        out: list[str] = []
        with torch.no_grad():
            for start in range(0, len(texts), 16):
                batch = [PARAPHRASE_PREFIX + t for t in texts[start:start + 16]]
                enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=128)
                # Beam search without sampling: the same prompts for the same seed.
                gen = model.generate(**enc, max_new_tokens=64, num_beams=4, do_sample=False)
                out.extend(tokenizer.batch_decode(gen, skip_special_tokens=True))
        return out

    return paraphrase


def _apply_paraphrases(prompts: list[str], origins: list[str], paraphrase: Callable[[list[str]], list[str]],
                       taxonomy: Taxonomy) -> tuple[list[str], int]:
    """Replace augmented prompts by their paraphrases where the paraphrase keeps every covered
    pair (so the selection's coverage survives); seed captions are left as written."""
    idx = [i for i, o in enumerate(origins) if o != "seed"]
    if not idx:
        return list(prompts), 0
    rewritten = paraphrase([prompts[i] for i in idx])
    out, n = list(prompts), 0
    seen = {_normalise(p) for p in prompts}
    for i, new in zip(idx, rewritten):
        new = _tidy(new) if new else ""
        if new and _normalise(new) not in seen and taxonomy.tag(prompts[i]) <= taxonomy.tag(new):
            seen.add(_normalise(new))
            out[i], n = new, n + 1
    return out, n
