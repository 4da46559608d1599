"""Prompt sets for calibration: seed captions and coverage-driven prompt augmentation.

Calibration sees only the activations that its prompts provoke, so the prompt set should span
the kinds of sound a user will ask for. This module makes that measurable and then acts on it:

1. **Taxonomy** (``adm_export/data/taxonomy.json``, kept as data): aspects of a sound (source
   category, pitch, timbre, loudness, duration and onset, rhythm, environment, layering,
   complexity), each with values; every value lists keywords that *detect* it in a caption and
   phrases or templates that *generate* text for it.
2. **Tagger** (:func:`tag_caption`): the (aspect, value) pairs a caption covers, by keyword
   matching on normalised text; layering and complexity are derived from structure (how many
   sources, how many descriptors) as well as keywords. Deterministic, no model.
3. **Operators** expand the seed captions into candidates that stay AudioCaps-style sentences:
   ``modify`` (one environment / loudness / pitch / timbre / rhythm / duration phrase),
   ``stack`` (two or three of them), ``swap`` (another source, within or across categories, with
   the seed's own attributes re-expressed), ``layer`` (two or more sources: "... while ...",
   "... with ... in the background"), ``compose`` (complex, surreal mixtures) and ``standalone``
   (simple one-event sentences from the taxonomy).
4. **Selection** (:func:`build_prompt_set`): greedy max-coverage of (aspect, value) pairs, seed
   captions first; the exact rule is in :func:`build_prompt_set`'s docstring.

Coverage is always measured by re-tagging the final text, never by what an operator meant to add.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import logging
import random
import re
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: Aspects every taxonomy must define (the issue's list); the tests check the shipped one.
REQUIRED_ASPECTS = (
    "source", "pitch", "timbre", "loudness", "duration", "rhythm", "environment", "layering", "complexity",
)

#: Longest candidate kept, in words: captions in the AudioCaps style are one short sentence, and
#: long run-ons would calibrate on text embeddings unlike what users type.
MAX_WORDS = 30

#: Prefix given to a text2text paraphrase model (T5-style task prefix).
PARAPHRASE_PREFIX = "paraphrase: "

_KINDS = ("source", "modifier", "derived")
_RULE_KEYS = ("min_sources", "max_sources", "min_descriptors", "max_descriptors")
# Parts of a caption, for counting how many sound sources it layers: conjunctions separate
# "A dog barks | birds chirp in the background" but not "a car engine idles".
_SEGMENT_SPLIT = re.compile(r";|\b(?:while|as|and|with|followed by|then|but|amid)\b")
# Derived-aspect templates are named after the operator that uses them, for the provenance counts.
_TEMPLATE_ORIGIN = {"layering": "layer", "complexity": "compose"}


# --------------------------------------------------------------------------------------------
# Public data types and caption files
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Prompts used for calibration, with a description of how they were made.

    Attributes:
        prompts: The prompts, in order.
        source: ``builtin`` or the captions file's path.
        coverage: Coverage table (see :func:`coverage_table`, plus the augmentation summary of
            :func:`build_prompt_set`); JSON-serialisable, empty when not computed.
    """

    prompts: tuple[str, ...]
    source: str
    coverage: dict = dataclasses.field(default_factory=dict)


def builtin_captions() -> list[str]:
    """The built-in AudioCaps-style seed captions shipped with the package."""
    text = resources.files("adm_export").joinpath("data/captions.txt").read_text(encoding="utf-8")
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
    except OSError as exc:
        raise InvalidInputError(f"--captions {str(path)!r} cannot be read ({exc.strerror})") from exc
    captions = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not captions:
        raise InvalidInputError(f"--captions {str(path)!r} holds no caption; write one caption per line")
    return captions


# --------------------------------------------------------------------------------------------
# Taxonomy and tagger
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Augmentation operators
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Candidate:
    text: str
    origin: str  # "seed" or the operator that made it
    tags: tuple[int, ...] = ()  # indices into the taxonomy's pair list
    priority: float = 0.0  # seeded random tie-break


def _tidy(text: str) -> str:
    """One sentence, AudioCaps style: single spaces, no space before commas, capital first
    letter, no final full stop (the built-in captions have none)."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+,", ",", text).rstrip(" .!;")
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    """"A dog barks" -> "a dog barks" to embed a sentence; "TV ..." stays as it is."""
    if len(text) > 1 and text[1].isupper():
        return text
    return text[:1].lower() + text[1:]


def _fill(template: str, a: str | None = None, **slots: str) -> str:
    """Fill a template's ``{a}`` (a sentence) and clause/noun slots; lower-case embedded ones."""
    values = {k: _lower_first(v) for k, v in slots.items()}
    if a is not None:
        a = _tidy(a)
        values["a"] = a if template.startswith("{a}") else _lower_first(a)
    return _tidy(template.format(**values))


def _slots(template: str) -> list[str]:
    return sorted(set(re.findall(r"\{(\w+)\}", template)))


class _Generator:
    """Makes augmentation candidates from seed captions; every choice draws on one seeded RNG."""

    def __init__(self, taxonomy: Taxonomy, seeds: Sequence[str], rng: random.Random):
        self.tax = taxonomy
        self.seeds = list(seeds)
        self.rng = rng
        self.seed_tags = [taxonomy.tag(s) for s in self.seeds]

    # -- helpers ------------------------------------------------------------------------------

    def _free_modifiers(self, tags: frozenset) -> list:
        # Only aspects the sentence does not already cover: adding "quietly" to "loudly" would
        # contradict it, and a second environment would make the scene incoherent.
        covered = {a for a, _ in tags}
        return [a for a in self.tax.modifiers if a.name not in covered and any(v.modify for v in a.values)]

    def _apply(self, sentence: str, choices: list) -> str:
        """Apply (aspect, value) modifier choices in canonical aspect order."""
        for k, (aspect, value) in enumerate(sorted(choices, key=lambda c: c[0].order)):
            template = self.rng.choice(value.modify)
            if k > 0 and template.startswith("{a} "):
                # "..., with a warm tone, in a large cathedral": a comma per added phrase keeps a
                # stack of prepositional phrases readable.
                template = "{a}, " + template[len("{a} "):]
            sentence = _fill(template, a=sentence)
        return _tidy(sentence)

    def _other_categories(self, tags: frozenset, k: int) -> list:
        """``k`` distinct source categories, those the sentence lacks first (new sources add
        coverage), in random order."""
        cats = [v for v in self.tax.source.values if v.nouns and v.clauses]
        have = {val for a, val in tags if a == self.tax.source.name}
        fresh = [v for v in cats if v.name not in have]
        stale = [v for v in cats if v.name in have]
        self.rng.shuffle(fresh)
        self.rng.shuffle(stale)
        return (fresh + stale)[:k]

    # -- operators ----------------------------------------------------------------------------

    def modify(self) -> Iterable[tuple[str, str]]:
        """One modifier phrase per (free aspect, value) for every seed."""
        for seed, tags in zip(self.seeds, self.seed_tags):
            for aspect in self._free_modifiers(tags):
                for value in aspect.values:
                    if value.modify:
                        yield self._apply(seed, [(aspect, value)]), "modify"

    def stack(self, per_seed: int, depth: int) -> Iterable[tuple[str, str]]:
        """``per_seed`` random combinations of ``depth`` modifiers of distinct free aspects."""
        for seed, tags in zip(self.seeds, self.seed_tags):
            free = self._free_modifiers(tags)
            if len(free) < depth:
                continue
            for _ in range(per_seed):
                aspects = self.rng.sample(free, depth)
                choices = [(a, self.rng.choice([v for v in a.values if v.modify])) for a in aspects]
                yield self._apply(seed, choices), "stack"

    def swap(self) -> Iterable[tuple[str, str]]:
        """Another source in the seed's setting: for every seed and every source category (its
        own = within-category swap, the others = between categories), a clause of that
        category with up to two of the seed's modifier values re-expressed by taxonomy phrases."""
        for seed, tags in zip(self.seeds, self.seed_tags):
            kept = sorted(((self.tax[a], v) for a, v in tags if self.tax[a].kind == "modifier"),
                          key=lambda c: (c[0].order, c[1]))
            for category in self.tax.source.values:
                clauses = [c for c in category.clauses if _normalise(c) != _normalise(seed)]
                if not clauses:
                    continue
                clause = self.rng.choice(clauses)
                clause_aspects = {a for a, _ in self.tax.tag(clause)}
                usable = [(a, a_value) for a, v in kept for a_value in a.values
                          if a_value.name == v and a_value.modify and a.name not in clause_aspects]
                # One value per aspect, at most two: more makes run-on sentences.
                by_aspect = {}
                for a, val in usable:
                    by_aspect.setdefault(a.name, (a, val))
                picked = list(by_aspect.values())
                if len(picked) > 2:
                    picked = self.rng.sample(picked, 2)
                yield self._apply(clause, picked), "swap"

    def templates(self) -> Iterable[tuple[str, str]]:
        """Layering and composition templates of the derived aspects, filled once per seed; a
        ``{b}`` clause comes once from another seed and once from the taxonomy."""
        for aspect in self.tax.derived:
            origin = _TEMPLATE_ORIGIN.get(aspect.name, f"template:{aspect.name}")
            for value in aspect.values:
                for template in value.templates:
                    slots = _slots(template)
                    for i, (seed, tags) in enumerate(zip(self.seeds, self.seed_tags)):
                        if "a" in slots and re.search(r"\bwhile\b", seed.lower()) and "while" in template:
                            continue  # "... while ... while ..." reads badly
                        fills = [False, True] if ("b" in slots and len(self.seeds) > 1) else [False]
                        for b_from_seed in fills:
                            text = self._fill_template(template, slots, i, seed, tags, b_from_seed)
                            if text:
                                yield text, origin

    def _fill_template(self, template, slots, i, seed, tags, b_from_seed) -> str | None:
        nouns_needed = [s for s in slots if s == "n" or re.fullmatch(r"n\d+", s)]
        cats = self._other_categories(tags, len(nouns_needed) + ("b" in slots))
        if len(cats) < len(nouns_needed) + ("b" in slots):
            return None
        values = {}
        for slot, cat in zip(nouns_needed, cats):
            values[slot] = self.rng.choice(cat.nouns)
        if "b" in slots:
            if b_from_seed:
                others = [j for j in range(len(self.seeds)) if j != i
                          and not re.search(r"\bwhile\b", self.seeds[j].lower())]
                if not others:
                    return None
                values["b"] = _tidy(self.seeds[self.rng.choice(others)])
            else:
                values["b"] = self.rng.choice(cats[-1].clauses)
        return _fill(template, a=seed if "a" in slots else None, **values)

    def standalone(self) -> Iterable[tuple[str, str]]:
        """Standalone sentences of the taxonomy (simple, single-event prompts)."""
        for aspect in self.tax.aspects:
            for value in aspect.values:
                for sentence in value.sentences:
                    yield _tidy(sentence), "standalone"


def _candidates(taxonomy: Taxonomy, seeds: Sequence[str], rng: random.Random, wanted: int) -> list[tuple[str, str]]:
    """Unique augmentation candidates (text, origin), at least ``wanted`` if the operators can.

    The first round runs every operator once; further rounds (only when ``wanted`` is larger
    than what one round gives) draw more random ``stack`` combinations and template fills.
    """
    gen = _Generator(taxonomy, seeds, rng)
    seen = {_normalise(s) for s in seeds}
    out: list[tuple[str, str]] = []

    def add(items: Iterable[tuple[str, str]]) -> int:
        n = 0
        for text, origin in items:
            key = _normalise(text)
            if key not in seen and len(key.split()) <= MAX_WORDS:
                seen.add(key)
                out.append((text, origin))
                n += 1
        return n

    add(gen.modify())
    add(gen.stack(per_seed=6, depth=2))
    add(gen.stack(per_seed=4, depth=3))
    add(gen.swap())
    add(gen.templates())
    add(gen.standalone())
    for _ in range(50):  # more rounds only for very large N; stop when they stop adding
        if len(out) >= wanted:
            break
        added = add(gen.stack(per_seed=8, depth=2)) + add(gen.stack(per_seed=8, depth=3)) + add(gen.templates())
        if added == 0:
            break
    return out


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _key(cand: _Candidate, counts: list[int], weights: list[float]) -> tuple:
    """Selection key of a candidate; larger is better (see :func:`build_prompt_set`)."""
    gains = [weights[p] / (1 + counts[p]) for p in cand.tags]
    new = sum(weights[p] for p in cand.tags if counts[p] == 0)
    # Rounding keeps float noise from overruling the seeded tie-break.
    return round(new, 9), round(max(gains, default=0.0), 9), round(sum(gains), 9), cand.priority


def _greedy(pool: list[_Candidate], k: int, counts: list[int], weights: list[float]) -> list[_Candidate]:
    """Pick ``k`` candidates of ``pool`` greedily by :func:`_key`, updating ``counts`` in place.

    Lazy evaluation (Minoux): every component of the key can only shrink as counts grow, so a
    stale key is an upper bound; a candidate whose fresh key still beats the best stale key is
    the one plain greedy would pick, at a fraction of the cost for large pools.
    """
    # Max-heap through negated keys; the pool index makes entries unique.
    heap = [(tuple(-x for x in _key(c, counts, weights)), i) for i, c in enumerate(pool)]
    heapq.heapify(heap)
    chosen: list[_Candidate] = []
    while heap and len(chosen) < k:
        _, i = heapq.heappop(heap)
        fresh = (tuple(-x for x in _key(pool[i], counts, weights)), i)
        if heap and fresh > heap[0]:
            heapq.heappush(heap, fresh)  # no longer the best: re-queue with its true key
            continue
        for p in pool[i].tags:
            counts[p] += 1
        chosen.append(pool[i])
    return chosen


def _dedupe(captions: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for c in captions:
        key = _normalise(c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    if len(out) < len(captions):
        logger.info("dropped %d duplicate seed caption(s)", len(captions) - len(out))
    return out


def build_prompt_set(
    captions_file: str | None,
    num_prompts: int,
    seed: int,
    *,
    augment: bool = True,
    paraphrase_model: str | None = None,
    seeds_first: bool = True,
) -> PromptSet:
    """The prompts of a calibration run: seed captions plus coverage-driven augmentation.

    Selection rule (greedy weighted max-coverage, then balancing). Let ``c[p]`` be how many
    prompts selected so far cover the (aspect, value) pair ``p`` (by :meth:`Taxonomy.tag`) and
    ``w[p]`` the weight of ``p``'s aspect (``weight`` in the taxonomy; 1.0 for every shipped
    aspect). Each step adds the candidate whose key is largest, keys compared in this order:

    1. ``sum(w[p] for its pairs with c[p] == 0)``: new coverage (the max-coverage greedy,
       within 1 - 1/e of the best N-subset of the candidates);
    2. ``max(w[p] / (1 + c[p]) over its pairs)``: once nothing new can be covered, the prompt
       that raises the rarest value it touches, so counts stay balanced (max-min style);
    3. ``sum(w[p] / (1 + c[p]) over its pairs)``: the marginal gain of the concave
       count-utility ``sum_p w[p] * H(c[p])`` (H the harmonic number);
    4. ``priority``: a number drawn for every candidate from ``random.Random(seed)``.

    Seed captions are selected first, by the same key among themselves (all of them when
    ``num_prompts`` is at least their number, otherwise the ``num_prompts`` that cover most);
    augmented candidates then fill the rest. Prompts are returned in selection order.

    Duplicates: seed captions are de-duplicated (case and punctuation ignored) and candidates
    equal to a seed or to each other are dropped; if ``num_prompts`` exceeds the seeds plus every
    candidate the operators can make (only for tiny caption files and very large N), the selected
    list is repeated cyclically and ``summary.duplicates`` says how many prompts are repeats.

    Args:
        captions_file: Seed captions file, or ``None`` for the built-in captions.
        num_prompts: Number of prompts wanted (exactly this many are returned).
        seed: Seed of every random choice (operators, tie-breaks); same seed, same prompts.
        augment: ``False`` keeps the plain behaviour: the seed captions, cycling.
        paraphrase_model: Optional transformers text2text model (hub id or local folder) that
            rewrites the augmented prompts; a rewrite is kept only if it covers every pair the
            original covered. Loaded lazily; never needed.
        seeds_first: ``False`` lets seed captions and candidates compete in one pool, so that a
            small ``num_prompts`` can trade seeds for coverage.

    Returns:
        The prompt set; ``coverage`` is :func:`coverage_table` of the prompts plus, under
        ``summary``, the seed captions' own coverage and how the set was made.

    Raises:
        InvalidInputError: Bad captions file, ``num_prompts`` < 1, or an unloadable
            ``paraphrase_model``.
    """
    t0 = time.perf_counter()
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise InvalidInputError(f"invalid --num-prompts {num_prompts!r}: must be a positive integer")
    # 1. Seeds, taxonomy, and the seed captions' own coverage (the baseline of the summary).
    source = str(captions_file) if captions_file else "builtin"
    seeds = _dedupe(load_captions(captions_file) if captions_file else builtin_captions())
    tax = load_taxonomy()
    if paraphrase_model and not augment:
        logger.warning("--paraphrase-model is ignored without augmentation: only augmented prompts are paraphrased")
    paraphrase = _load_paraphraser(paraphrase_model) if (paraphrase_model and augment) else None
    seed_cov = coverage_table(seeds, tax)["summary"]
    logger.info("prompt set: %d seed caption(s) from %s cover %d/%d (aspect, value) pairs",
                len(seeds), source, seed_cov["pairs_covered"], seed_cov["num_pairs"])

    if not augment:
        # 2a. Plain behaviour, kept for baselines: the captions in file order, cycling.
        prompts = [seeds[i % len(seeds)] for i in range(num_prompts)]
        origins = ["seed"] * num_prompts
    else:
        # 2b. Candidates, tagged once; every candidate gets its seeded tie-break priority.
        rng = random.Random(seed)
        index = {p: i for i, p in enumerate(tax.pairs())}
        weights = [tax[a].weight for a, _ in tax.pairs()]

        def make(text: str, origin: str) -> _Candidate:
            return _Candidate(text, origin, tuple(sorted(index[p] for p in tax.tag(text))), rng.random())

        seed_pool = [make(s, "seed") for s in seeds]
        extra_needed = max(0, num_prompts - len(seeds))
        cand_pool = [make(t, o) for t, o in _candidates(tax, seeds, rng, wanted=extra_needed)]
        # 3. Greedy selection (rule in the docstring).
        counts = [0] * len(weights)
        if seeds_first:
            chosen = _greedy(seed_pool, num_prompts, counts, weights)
            chosen += _greedy(cand_pool, num_prompts - len(chosen), counts, weights)
        else:
            chosen = _greedy(seed_pool + cand_pool, num_prompts, counts, weights)
        prompts = [c.text for c in chosen]
        origins = [c.origin for c in chosen]
        if len(prompts) < num_prompts:
            logger.warning("only %d distinct prompts could be made from %d seed caption(s); repeating them "
                           "to reach --num-prompts %d", len(prompts), len(seeds), num_prompts)
            prompts = [prompts[i % len(prompts)] for i in range(num_prompts)]
            origins = [origins[i % len(origins)] for i in range(num_prompts)]

    # 4. Optional paraphrasing of the augmented prompts (coverage-preserving).
    paraphrased = 0
    if paraphrase is not None:
        prompts, paraphrased = _apply_paraphrases(prompts, origins, paraphrase, tax)

    # 5. Coverage of what is actually returned, re-tagged from the final text.
    coverage = coverage_table(prompts, tax)
    summary = coverage["summary"]
    summary.update({
        "seed": seed,
        "augment": augment,
        "seeds_first": seeds_first if augment else None,
        "selection": "greedy max-coverage, then rarest-value balance, seeded tie-break" if augment else "seed captions, cycling",
        "seed_captions": {
            "count": len(seeds),
            "pairs_covered": seed_cov["pairs_covered"],
            "fraction_covered": seed_cov["fraction_covered"],
        },
        "num_seed_prompts": sum(1 for o in origins if o == "seed"),
        "num_augmented_prompts": sum(1 for o in origins if o != "seed"),
        "duplicates": len(prompts) - len({_normalise(p) for p in prompts}),
        "operators": dict(sorted(Counter(origins).items())),
        "paraphrase_model": paraphrase_model,
        "paraphrased": paraphrased,
    })
    logger.info("prompt set: %d prompts cover %d/%d pairs (seed captions alone: %d) in %.2f s",
                len(prompts), summary["pairs_covered"], summary["num_pairs"], seed_cov["pairs_covered"],
                time.perf_counter() - t0)
    return PromptSet(prompts=tuple(prompts), source=source, coverage=coverage)


# --------------------------------------------------------------------------------------------
# Optional paraphrasing
# --------------------------------------------------------------------------------------------


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
