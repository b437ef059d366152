"""The hand-written generalisation test sets: shape, pairing, balance, and kept apart from what vectors are made of."""

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from personavec.pipeline.check import read_check_files

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "generalisation"
TRAITS = ("optimistic", "humorous", "impolite")
REGISTERS = ("emotional", "terse", "marketing", "formal")
SETS = sorted(DATA.glob("*_*.jsonl"))
TEST_SETS = [p for p in SETS if p.name != "style_pairs.jsonl"]


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def question(row):
    return row["messages"][0]["content"]


def test_every_trait_has_every_register_and_optimistic_has_hopeful_vs_gloomy():
    names = {p.stem for p in TEST_SETS}
    assert names == {f"{t}_{r}" for t in TRAITS for r in REGISTERS} | {"optimistic_hopeful_gloomy"}


@pytest.mark.parametrize("path", TEST_SETS, ids=lambda p: p.stem)
def test_each_set_is_at_least_40_matched_pairs(path):
    (records, labels), = read_check_files([path]).values()  # the same validation `extract --check` applies
    data = rows(path)
    pairs = defaultdict(list)
    for row in data:
        pairs[row["pair"]].append(row)
    assert len(pairs) >= 40
    register = path.stem.split("_", 1)[1]
    for pair, members in pairs.items():
        assert sorted(m["label"] for m in members) == [0, 1], pair
        assert len({question(m) for m in members}) == 1, pair  # the same question answered both ways
        assert {m["register"] for m in members} == {register}, pair
        assert all(len(m["messages"]) == 2 and m["messages"][1]["role"] == "assistant" for m in members)
    # length must not give the label away: mean word counts of the two sides within 15% of each other
    words = {y: [len(r["messages"][1]["content"].split()) for r in data if r["label"] == y] for y in (0, 1)}
    mean = {y: sum(w) / len(w) for y, w in words.items()}
    assert abs(mean[1] - mean[0]) / max(mean.values()) < 0.15, mean
    assert len({question(r) for r in data}) == len(pairs)  # no question asked twice in a set


@pytest.mark.model
def test_token_length_alone_does_not_give_the_label_away():
    """With the packaged model's tokenizer, the answer's length separates the labels at 0.40-0.60 AUROC in every set."""
    from transformers import AutoTokenizer

    from personavec.models import resolve
    from personavec.vecmath import auroc

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    for path in TEST_SETS:
        data = rows(path)
        lengths = [len(tokenizer(r["messages"][1]["content"])["input_ids"]) for r in data]
        assert 0.4 <= auroc([r["label"] for r in data], lengths) <= 0.6, path.name


def _words(text):
    stop = {"the", "a", "i", "my", "do", "how", "to", "is", "what", "should", "of", "and", "in", "it", "for", "you",
            "your", "on", "can", "why", "does"}
    return set(re.findall(r"[a-z']+", text.lower())) - stop


def _sources_questions():
    out = []
    for trait in (ROOT / "personavec" / "traits" / "data").glob("*.json"):
        data = json.loads(trait.read_text())
        out += data["questions"]["extract"] + data["questions"]["eval"]
    for path in (ROOT / "experiments" / "data").glob("*.jsonl"):
        out += [question(r) for r in rows(path)]
    return out


def test_questions_are_apart_from_what_vectors_are_made_from():
    """No test (or style) question repeats a trait file's questions or the experiments data, even reworded a little."""
    others = [(q, _words(q)) for q in _sources_questions()]
    for path in SETS:
        for q in {question(r) for r in rows(path)}:
            mine = _words(q)
            for other, theirs in others:
                overlap = len(mine & theirs) / len(mine | theirs)
                assert overlap < 0.75, (path.name, q, other)


def test_style_pairs_are_one_content_in_every_register_without_labels():
    data = rows(DATA / "style_pairs.jsonl")
    by_pair = defaultdict(dict)
    for row in data:
        assert "label" not in row
        by_pair[row["pair"]][row["register"]] = question(row)
    registers = set(next(iter(by_pair.values())))
    assert len(registers) >= 4 and len(by_pair) >= 20
    for pair, members in by_pair.items():
        assert set(members) == registers, pair
        assert len(set(members.values())) == 1, pair
    test_questions = {question(r) for p in TEST_SETS for r in rows(p)}
    assert not test_questions & {question(r) for r in data}
