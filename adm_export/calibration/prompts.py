"""Prompt sets for calibration: seed captions, and (in a later step) coverage-driven augmentation."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from adm_export.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Prompts used for calibration, with a description of how they were made.

    Attributes:
        prompts: The prompts, in order.
        source: ``builtin`` or the captions file's path.
        coverage: Coverage table (aspect -> value -> count); empty when not computed.
    """

    prompts: tuple[str, ...]
    source: str
    coverage: dict = dataclasses.field(default_factory=dict)


def builtin_captions() -> list[str]:
    """The built-in AudioCaps-style seed captions shipped with the package."""
    text = resources.files("adm_export").joinpath("data/captions.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_captions(path: str | Path) -> list[str]:
    """Read one caption per line (blank lines and ``#`` comments skipped).

    Raises:
        InvalidInputError: The file is missing, unreadable or holds no caption.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"--captions {str(path)!r} is not a file; give a text file with one caption per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"--captions {str(path)!r} is not UTF-8 text ({exc.reason})") from exc
    captions = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not captions:
        raise InvalidInputError(f"--captions {str(path)!r} holds no caption; write one caption per line")
    return captions


def build_prompt_set(captions_file: str | None, num_prompts: int, seed: int) -> PromptSet:
    """The prompts of a calibration run: ``num_prompts`` taken from the seed captions, cycling.

    Args:
        captions_file: Seed captions file, or ``None`` for the built-in captions.
        num_prompts: Number of prompts wanted.
        seed: Seed of the choice (unused by the plain version; kept for augmentation).
    """
    captions = load_captions(captions_file) if captions_file else builtin_captions()
    prompts = tuple(captions[i % len(captions)] for i in range(num_prompts))
    return PromptSet(prompts=prompts, source=str(captions_file) if captions_file else "builtin")
