"""Prompt sets: taxonomy, tagger, augmentation operators, greedy coverage selection."""

import json
import os
import random
import subprocess
import sys

import pytest

from adm_export.calibration import prompts as P
from adm_export.errors import InvalidInputError

SOURCE_CATEGORIES = {
    "nature", "animals", "vehicles", "human voice and body", "music and instruments", "domestic",
    "mechanical and industrial", "alarms and signals", "synthetic and abstract",
}
ASPECTS = {"source", "pitch", "timbre", "loudness", "duration", "rhythm", "environment", "layering", "complexity"}


@pytest.fixture(scope="module")
def tax():
    return P.load_taxonomy()


@pytest.fixture(scope="module")
def set64():
    return P.build_prompt_set(None, 64, 0)


# -- taxonomy ----------------------------------------------------------------------------------


def test_taxonomy_has_every_aspect_and_source_category(tax):
    names = {a.name for a in tax.aspects}
    assert ASPECTS <= names
    assert set(P.REQUIRED_ASPECTS) == ASPECTS
    assert {v.name for v in tax["source"].values} == SOURCE_CATEGORIES
    assert {v.name for v in tax["layering"].values} >= {"single source", "two sources", "many sources"}
    assert {v.name for v in tax["complexity"].values} >= {"simple", "complex"}
    # Every value can be detected and generated.
    for a in tax.aspects:
        for v in a.values:
            assert v.detect is not None or v.rules, (a.name, v.name)
            if a.kind == "modifier":
                assert v.modify, (a.name, v.name)
            if a.kind == "source":
                assert v.clauses and v.nouns, v.name


def test_generated_phrases_are_detected_as_their_own_value(tax):
    neutral = "A sound plays"
    assert P.tag_caption(neutral) == frozenset()
    for a in tax.modifiers:
        for v in a.values:
            for template in v.modify:
                text = P._fill(template, a=neutral)
                tags = tax.tag(text)
                assert {t for t in tags if t[0] == a.name} == {(a.name, v.name)}, text
                # No leakage into another descriptive aspect either.
                assert all(tax[t[0]].kind == "derived" or t[0] == a.name for t in tags), (text, tags)
    for v in tax["source"].values:
        for phrase in v.clauses + v.nouns:
            assert ("source", v.name) in tax.tag(phrase), phrase
    for sentence in tax["complexity"].values[0].sentences:
        assert ("complexity", "simple") in tax.tag(sentence), sentence


# -- tagger ------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption, expected", [
    ("A dog barks repeatedly in the distance",
     {("source", "animals"), ("rhythm", "repeated"), ("environment", "far away"), ("layering", "single source")}),
    ("Thunder RUMBLES loudly in a large cathedral!",
     {("source", "nature"), ("pitch", "low"), ("loudness", "loud"), ("environment", "large reverberant space")}),
    ("A high-pitched electronic beeping, then it stops abruptly",
     {("source", "synthetic and abstract"), ("source", "alarms and signals"), ("pitch", "high"),
      ("duration", "abrupt ending")}),
    ("A woman's muffled voice fades away while a train passes",
     {("source", "human voice and body"), ("source", "vehicles"), ("timbre", "muffled"), ("loudness", "fading"),
      ("layering", "two sources")}),
    ("Suddenly, a metallic clanging echoes underwater",
     {("duration", "sudden onset"), ("timbre", "metallic"), ("environment", "underwater")}),
    ("A single, continuous alarm beep",
     {("source", "alarms and signals"), ("duration", "sustained"), ("layering", "single source"),
      ("complexity", "simple")}),
    ("A surreal, dissonant melody with mechanical grinding, bursts of static and alien-like vocalizations",
     {("source", "music and instruments"), ("source", "mechanical and industrial"),
      ("source", "synthetic and abstract"), ("timbre", "harsh"), ("timbre", "noisy"), ("rhythm", "irregular"),
      ("layering", "many sources"), ("complexity", "complex")}),
])
def test_tagger_detects_known_values(caption, expected):
    tags = P.tag_caption(caption)
    assert expected <= tags, sorted(expected - tags)


def test_tagger_normalisation_and_no_false_friends(tax):
    assert P.tag_caption("DOGS BARKING!!") == P.tag_caption("dogs barking")
    assert ("source", "animals") in P.tag_caption("dogs barking")
    # "bee" must not match "being", "loud" not "louder" (which is a crescendo), "single" words only.
    assert ("source", "animals") not in P.tag_caption("Nothing is being said")
    assert ("loudness", "getting louder") in P.tag_caption("An engine gets louder")
    assert ("loudness", "loud") not in P.tag_caption("An engine gets louder")
    # Derived aspects take exactly one value each.
    for caption in P.builtin_captions():
        tags = tax.tag(caption)
        for aspect in ("layering", "complexity"):
            assert len([t for t in tags if t[0] == aspect]) == 1, (caption, tags)


# -- augmentation and selection ------------------------------------------------------------------


def test_augmentation_increases_coverage_over_seed_captions(set64):
    s = set64.coverage["summary"]
    seed = P.coverage_table(P.builtin_captions())["summary"]
    assert s["seed_captions"]["pairs_covered"] == seed["pairs_covered"]
    assert s["pairs_covered"] > seed["pairs_covered"]
    assert s["fraction_covered"] > s["seed_captions"]["fraction_covered"]
    assert s["num_seed_prompts"] == len(P.builtin_captions())  # seeds first, all of them
    assert set(set64.prompts[: len(P.builtin_captions())]) == set(P.builtin_captions())


def test_same_seed_same_prompts_other_seed_may_differ():
    a = P.build_prompt_set(None, 40, 7)
    assert P.build_prompt_set(None, 40, 7) == a
    b = P.build_prompt_set(None, 40, 8)
    assert len(b.prompts) == 40
    assert a.prompts != b.prompts  # the seed reaches the operators and tie-breaks


def test_prompts_do_not_depend_on_python_hash_seed():
    code = "from adm_export.calibration.prompts import build_prompt_set as b; print(repr(b(None, 48, 3).prompts))"
    outs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1


@pytest.mark.parametrize("n", [1, 5, 24, 25, 200])
def test_exactly_n_prompts_without_duplicates(n):
    ps = P.build_prompt_set(None, n, 0)
    assert len(ps.prompts) == n
    assert len({P._normalise(p) for p in ps.prompts}) == n
    s = ps.coverage["summary"]
    assert s["num_prompts"] == n and s["duplicates"] == 0
    n_seeds = len(P.builtin_captions())
    assert s["num_seed_prompts"] == min(n, n_seeds)
    assert s["num_augmented_prompts"] == max(0, n - n_seeds)
    if n < n_seeds:
        assert set(ps.prompts) <= set(P.builtin_captions())


def test_fewer_seeds_than_prompts_picks_the_most_covering_seeds():
    ps = P.build_prompt_set(None, 5, 0)
    seeds = P.builtin_captions()
    covered = ps.coverage["summary"]["pairs_covered"]
    rng = random.Random(0)
    for _ in range(20):  # greedy beats (or ties) random 5-subsets of the seeds
        assert covered >= P.coverage_table(rng.sample(seeds, 5))["summary"]["pairs_covered"]


def test_tiny_caption_file_repeats_only_when_the_pool_is_exhausted(tmp_path):
    f = tmp_path / "captions.txt"
    f.write_text("# one caption\nA dog barks\n\na dog barks.\n")
    small = P.build_prompt_set(str(f), 50, 0)
    assert small.source == str(f)
    assert small.prompts[0] == "A dog barks" and small.coverage["summary"]["duplicates"] == 0
    assert small.coverage["summary"]["seed_captions"]["count"] == 1  # the near-duplicate seed is dropped
    huge = P.build_prompt_set(str(f), 1500, 0)
    assert len(huge.prompts) == 1500
    distinct = len({P._normalise(p) for p in huge.prompts})
    assert 0 < huge.coverage["summary"]["duplicates"] == 1500 - distinct


def test_seeds_first_false_trades_seeds_for_coverage():
    first = P.build_prompt_set(None, 8, 0)
    pooled = P.build_prompt_set(None, 8, 0, seeds_first=False)
    assert first.coverage["summary"]["num_seed_prompts"] == 8
    assert pooled.coverage["summary"]["pairs_covered"] > first.coverage["summary"]["pairs_covered"]


def test_augment_false_keeps_the_plain_cycling():
    ps = P.build_prompt_set(None, 30, 0, augment=False)
    seeds = P.builtin_captions()
    assert ps.prompts == tuple(seeds[i % len(seeds)] for i in range(30))
    assert ps.coverage["summary"]["duplicates"] == 30 - len(seeds)


def test_candidates_are_tidy_sentences(tax):
    rng = random.Random(0)
    cands = P._candidates(tax, P.builtin_captions(), rng, wanted=0)
    origins = {o for _, o in cands}
    assert {"modify", "stack", "swap", "layer", "compose", "standalone"} <= origins
    for text, _ in cands:
        assert text[0].isupper() and "{" not in text and "  " not in text and " ," not in text, text
        assert not text.endswith("."), text
        assert len(text.split()) <= P.MAX_WORDS, text
    keys = [P._normalise(t) for t, _ in cands]
    assert len(keys) == len(set(keys))
    assert not set(keys) & {P._normalise(s) for s in P.builtin_captions()}


def test_lazy_greedy_matches_plain_greedy(tax):
    rng = random.Random(1)
    index = {p: i for i, p in enumerate(tax.pairs())}
    pool = [P._Candidate(t, o, tuple(sorted(index[p] for p in tax.tag(t))), rng.random())
            for t, o in P._candidates(tax, P.builtin_captions()[:6], rng, wanted=0)]
    weights = [1.0] * len(index)

    def plain(k):
        counts, left, out = [0] * len(weights), list(pool), []
        for _ in range(k):
            best = max(left, key=lambda c: P._key(c, counts, weights))
            left.remove(best)
            for p in best.tags:
                counts[p] += 1
            out.append(best.text)
        return out

    assert [c.text for c in P._greedy(pool, 60, [0] * len(weights), weights)] == plain(60)


# -- coverage table ------------------------------------------------------------------------------


def test_coverage_counts_match_retagging(set64, tax):
    cov = set64.coverage
    assert cov["aspects"] == P.coverage_table(set64.prompts)["aspects"]
    manual = {a: {v: 0 for v in vals} for a, vals in cov["aspects"].items()}
    for prompt in set64.prompts:
        for a, v in P.tag_caption(prompt):
            manual[a][v] += 1
    assert manual == cov["aspects"]
    s = cov["summary"]
    assert s["num_pairs"] == len(tax.pairs())
    assert s["pairs_covered"] == sum(1 for vals in manual.values() for c in vals.values() if c)
    assert s["num_prompts"] == 64 and sum(s["operators"].values()) == 64
    assert json.loads(json.dumps(cov)) == cov  # stored as is in the cache manifest


def test_coverage_table_is_pure():
    empty = P.coverage_table([])
    assert empty["summary"]["pairs_covered"] == 0 and empty["summary"]["fraction_covered"] == 0
    one = P.coverage_table(["A dog barks", "A dog barks"])
    assert one["aspects"]["source"]["animals"] == 2
    assert "source/animals" not in one["summary"]["uncovered"]
    assert P.coverage_table(["A dog barks"]) == P.coverage_table(["A dog barks"])


# -- errors --------------------------------------------------------------------------------------


def _one_line_naming(exc_info, flag):
    msg = str(exc_info.value)
    assert flag in msg and "\n" not in msg, msg


def test_load_captions_errors(tmp_path):
    with pytest.raises(InvalidInputError) as e:
        P.load_captions(tmp_path / "missing.txt")
    _one_line_naming(e, "--captions")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InvalidInputError) as e:
        P.load_captions(empty)
    _one_line_naming(e, "--captions")
    comments = tmp_path / "comments.txt"
    comments.write_text("# only a comment\n\n   \n")
    with pytest.raises(InvalidInputError) as e:
        P.build_prompt_set(str(comments), 4, 0)
    _one_line_naming(e, "--captions")


def test_bad_num_prompts():
    with pytest.raises(InvalidInputError) as e:
        P.build_prompt_set(None, 0, 0)
    _one_line_naming(e, "--num-prompts")


def test_unloadable_paraphrase_model(tmp_path):
    with pytest.raises(InvalidInputError) as e:
        P.build_prompt_set(None, 4, 0, paraphrase_model=str(tmp_path / "no-such-model"))
    _one_line_naming(e, "--paraphrase-model")
    with pytest.raises(InvalidInputError) as e:  # a folder, but not a saved model
        P.build_prompt_set(None, 4, 0, paraphrase_model=str(tmp_path))
    _one_line_naming(e, "--paraphrase-model")


def test_paraphrases_kept_only_when_coverage_survives(tax):
    prompts = ["A dog barks", "A dog barks loudly in a large hall", "A cat meows quietly"]
    origins = ["seed", "modify", "modify"]
    rewrites = {prompts[1]: "In a big hall, a dog barks loudly.", prompts[2]: "A cat makes a sound"}
    out, n = P._apply_paraphrases(prompts, origins, lambda texts: [rewrites[t] for t in texts], tax)
    assert out == ["A dog barks", "In a big hall, a dog barks loudly", "A cat meows quietly"]
    assert n == 1
