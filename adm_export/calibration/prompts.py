"""Prompt sets for calibration: seed captions and coverage-driven prompt augmentation.

Calibration sees only the activations that its prompts provoke, so the prompt set should span
the kinds of sound a user will ask for. This module makes that measurable and then acts on it:

1. **Taxonomy** (``adm_export/data/taxonomy.json``, kept as data; :mod:`adm_export.calibration.taxonomy`):
   aspects of a sound (source category, pitch, timbre, loudness, duration and onset, rhythm,
   environment, layering, complexity), each with values; every value lists keywords that *detect*
   it in a caption and phrases or templates that *generate* text for it.
2. **Tagger** (:func:`~adm_export.calibration.taxonomy.tag_caption`): the (aspect, value) pairs a
   caption covers, by keyword matching on normalised text; layering and complexity are derived
   from structure (how many sources, how many descriptors) as well as keywords. Deterministic.
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
import heapq
import logging
import random
import re
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from adm_export.calibration.paraphrase import _apply_paraphrases, _load_paraphraser
from adm_export.calibration.taxonomy import Taxonomy, _normalise, _tidy, coverage_table, load_taxonomy
from adm_export.calibration.taxonomy import REQUIRED_ASPECTS, tag_caption  # noqa: F401 - part of this interface
from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: Longest candidate kept, in words: captions in the AudioCaps style are one short sentence, and
#: long run-ons would calibrate on text embeddings unlike what users type.
MAX_WORDS = 30

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
# Augmentation operators
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Candidate:
    text: str
    origin: str  # "seed" or the operator that made it
    tags: tuple[int, ...] = ()  # indices into the taxonomy's pair list
    priority: float = 0.0  # seeded random tie-break


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
