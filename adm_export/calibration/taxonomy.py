"""The sound taxonomy and the caption tagger: what a prompt set covers, measured.

The taxonomy (``adm_export/data/taxonomy.json``, kept as data) lists aspects of a sound (source
category, pitch, timbre, loudness, duration and onset, rhythm, environment, layering, complexity),
each with values; every value lists keywords that *detect* it in a caption and phrases or templates
that *generate* text for it. :func:`tag_caption` gives the (aspect, value) pairs a caption covers, by
keyword matching on normalised text (layering and complexity also from structure: how many sources,
how many descriptors); :func:`coverage_table` counts them over a prompt set. Deterministic, no
model. The augmentation that acts on it is :mod:`adm_export.calibration.prompts`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Sequence

from adm_export.errors import InvalidInputError

#: Aspects every taxonomy must define (the issue's list); the tests check the shipped one.
REQUIRED_ASPECTS = (
    "source", "pitch", "timbre", "loudness", "duration", "rhythm", "environment", "layering", "complexity",
)

_KINDS = ("source", "modifier", "derived")
_RULE_KEYS = ("min_sources", "max_sources", "min_descriptors", "max_descriptors")
# Parts of a caption, for counting how many sound sources it layers: conjunctions separate
# "A dog barks | birds chirp in the background" but not "a car engine idles".
_SEGMENT_SPLIT = re.compile(r";|\b(?:while|as|and|with|followed by|then|but|amid)\b")


def _normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics as one space, padded: the text keywords see.

    Hyphens and apostrophes become spaces too, so "high-pitched" matches "high pitched" and
    "woman's" matches "woman".
    """
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def _word_pattern(word: str) -> str:
    """Regex of one keyword word: ``*`` = any ending, else the word with simple inflections."""
    if word.endswith("*"):
        return re.escape(word[:-1]) + "[a-z0-9]*"
    if len(word) < 3 or not word.isalpha():
        return re.escape(word)  # "a", "of", "8": inflecting them would match unrelated words
    if word.endswith("e") and not word.endswith("ee"):
        # Drop the final e before -ing ("rumble" -> "rumbling"); "bee" must not match "being".
        return re.escape(word[:-1]) + "(?:e|es|ed|ing)"
    return re.escape(word) + "(?:s|es|ed|ing|ly)?"


def _keyword_regex(keywords: Sequence[str]) -> re.Pattern | None:
    """One regex matching any of ``keywords`` as whole words of normalised text."""
    alternatives = []
    for kw in keywords:
        # Same normalisation as the text, keeping the "*" wildcard.
        words = re.sub(r"[^a-z0-9*]+", " ", kw.lower()).split()
        if words:
            alternatives.append(r"\s".join(_word_pattern(w) for w in words))
    if not alternatives:
        return None
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(alternatives) + r")(?![a-z0-9])")


@dataclasses.dataclass(frozen=True)
class _Value:
    aspect: str
    name: str
    detect: re.Pattern | None
    rules: tuple[dict, ...]
    modify: tuple[str, ...]
    clauses: tuple[str, ...]
    nouns: tuple[str, ...]
    templates: tuple[str, ...]
    sentences: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Aspect:
    name: str
    kind: str
    order: int
    weight: float
    values: tuple[_Value, ...]


class Taxonomy:
    """The aspects and values of the coverage taxonomy, with compiled detectors.

    Args:
        data: The parsed taxonomy JSON (see ``adm_export/data/taxonomy.json`` for the schema).
        origin: Where ``data`` came from, for error messages.

    Raises:
        ValueError: ``data`` does not follow the schema.
    """

    def __init__(self, data: dict, origin: str = "taxonomy"):
        self.version = int(data.get("version", 1))
        aspects = []
        try:
            items = data["aspects"].items()
        except (KeyError, AttributeError) as exc:
            raise ValueError(f"{origin}: no 'aspects' object") from exc
        for a_name, a in items:
            kind = a.get("kind", "modifier")
            if kind not in _KINDS:
                raise ValueError(f"{origin}: aspect {a_name!r} has kind {kind!r}; choose one of {_KINDS}")
            values = []
            for v_name, v in a["values"].items():
                rules = tuple(v.get("rules", ()))
                for rule in rules:
                    unknown = set(rule) - set(_RULE_KEYS)
                    if unknown:
                        raise ValueError(f"{origin}: {a_name}/{v_name} rule has unknown keys {sorted(unknown)}")
                if kind == "derived" and not rules and not v.get("detect"):
                    raise ValueError(f"{origin}: derived value {a_name}/{v_name} has neither keywords nor rules")
                if kind != "derived" and not v.get("detect"):
                    raise ValueError(f"{origin}: {a_name}/{v_name} has no 'detect' keywords")
                values.append(_Value(
                    aspect=a_name, name=v_name, detect=_keyword_regex(v.get("detect", ())), rules=rules,
                    modify=tuple(v.get("modify", ())), clauses=tuple(v.get("clauses", ())),
                    nouns=tuple(v.get("nouns", ())), templates=tuple(v.get("templates", ())),
                    sentences=tuple(v.get("sentences", ())),
                ))
            aspects.append(_Aspect(name=a_name, kind=kind, order=int(a.get("order", 0)),
                                   weight=float(a.get("weight", 1.0)), values=tuple(values)))
        self.aspects: tuple[_Aspect, ...] = tuple(aspects)
        self._by_name = {a.name: a for a in self.aspects}
        sources = [a for a in self.aspects if a.kind == "source"]
        if len(sources) != 1:
            raise ValueError(f"{origin}: exactly one aspect of kind 'source' is needed, found {len(sources)}")
        self.source: _Aspect = sources[0]
        # Modifiers are applied in this order so stacked phrases read naturally: rhythm right after
        # the verb, the environment late, the ending ("then stops") last.
        self.modifiers: tuple[_Aspect, ...] = tuple(
            sorted((a for a in self.aspects if a.kind == "modifier"), key=lambda a: a.order))
        self.derived: tuple[_Aspect, ...] = tuple(a for a in self.aspects if a.kind == "derived")

    def __getitem__(self, aspect: str) -> _Aspect:
        return self._by_name[aspect]

    def pairs(self) -> list[tuple[str, str]]:
        """Every (aspect, value) pair, in taxonomy order."""
        return [(a.name, v.name) for a in self.aspects for v in a.values]

    def count_sources(self, caption: str) -> int:
        """How many sound sources a caption layers.

        Conjunctions ("while", "as", "and", "with", "followed by", ...) separate sources: each
        part naming a source counts once. Within a part, a comma separates list items ("grinding,
        bursts of static") but also adjectives ("a slow, gentle melody"); a comma item counts
        only if it names a source category the item before it did not, which tells the two apart.
        """
        count = 0
        for part in _SEGMENT_SPLIT.split(caption.lower()):
            previous: set[str] | None = None
            for item in part.split(","):
                text = _normalise(item)
                cats = {v.name for v in self.source.values if v.detect is not None and v.detect.search(text)}
                if not cats:
                    continue
                if previous is None or not cats <= previous:
                    count += 1
                previous = cats
        return count

    def tag(self, caption: str) -> frozenset[tuple[str, str]]:
        """The (aspect, value) pairs ``caption`` covers.

        Source and modifier values are covered when one of their keywords occurs. A derived aspect
        takes at most one value: the highest (last listed) value whose keywords occur or whose
        rules hold; captions that name no source and no modifier get no derived value.
        """
        text = _normalise(caption)
        found = {(a.name, v.name) for a in self.aspects if a.kind != "derived"
                 for v in a.values if v.detect is not None and v.detect.search(text)}
        if not found:
            return frozenset()
        stats = {
            "sources": self.count_sources(caption),
            "descriptors": sum(1 for a, _ in found if self._by_name[a].kind == "modifier"),
        }
        for aspect in self.derived:
            chosen = None
            for v in aspect.values:  # later values win: they are the "more" end of the scale
                if (v.detect is not None and v.detect.search(text)) or any(_rule_holds(r, stats) for r in v.rules):
                    chosen = v.name
            if chosen is not None:
                found.add((aspect.name, chosen))
        return frozenset(found)


def _rule_holds(rule: dict, stats: dict) -> bool:
    for key, bound in rule.items():
        kind, stat = key.split("_", 1)
        if kind == "min" and stats[stat] < bound:
            return False
        if kind == "max" and stats[stat] > bound:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _builtin_taxonomy() -> Taxonomy:
    text = resources.files("adm_export").joinpath("data/taxonomy.json").read_text(encoding="utf-8")
    return Taxonomy(json.loads(text), origin="adm_export/data/taxonomy.json")


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """The built-in taxonomy, or one read from a JSON file with the same schema.

    Raises:
        InvalidInputError: ``path`` is missing or not a valid taxonomy.
    """
    if path is None:
        return _builtin_taxonomy()
    try:
        return Taxonomy(json.loads(Path(path).read_text(encoding="utf-8")), origin=str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"taxonomy {str(path)!r} cannot be used: {exc}") from exc


def tag_caption(caption: str, taxonomy: Taxonomy | None = None) -> frozenset[tuple[str, str]]:
    """The (aspect, value) pairs a caption covers; see :meth:`Taxonomy.tag`."""
    return (taxonomy or load_taxonomy()).tag(caption)


def coverage_table(prompts: Sequence[str], taxonomy: Taxonomy | None = None) -> dict:
    """How many prompts cover each (aspect, value) pair; pure and JSON-serialisable.

    Args:
        prompts: Any list of prompts (duplicates count each time).
        taxonomy: The taxonomy; the built-in one by default.

    Returns:
        ``{"taxonomy_version", "aspects": {aspect: {value: count}}, "summary": {"num_prompts",
        "num_pairs", "pairs_covered", "fraction_covered", "uncovered": ["aspect/value", ...]}}``.
    """
    tax = taxonomy or load_taxonomy()
    counts = {a.name: {v.name: 0 for v in a.values} for a in tax.aspects}
    for prompt in prompts:
        for aspect, value in tax.tag(prompt):
            counts[aspect][value] += 1
    uncovered = [f"{a}/{v}" for a, v in tax.pairs() if counts[a][v] == 0]
    num_pairs = len(tax.pairs())
    return {
        "taxonomy_version": tax.version,
        "aspects": counts,
        "summary": {
            "num_prompts": len(prompts),
            "num_pairs": num_pairs,
            "pairs_covered": num_pairs - len(uncovered),
            "fraction_covered": round((num_pairs - len(uncovered)) / num_pairs, 4),
            "uncovered": uncovered,
        },
    }


def _tidy(text: str) -> str:
    """One sentence, AudioCaps style: single spaces, no space before commas, capital first
    letter, no final full stop (the built-in captions have none)."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+,", ",", text).rstrip(" .!;")
    return text[:1].upper() + text[1:]
