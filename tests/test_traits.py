"""Trait artifacts, their validation errors, the calibration and capability data, and `traits` CLI."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from personavec.cli.traits import register
from personavec.errors import PersonavecError
from personavec.traits import Trait, list_traits, load_trait, validate_trait

BUILTINS = ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"]
ARTICLES = {"evil": "an", "sycophantic": "a", "hallucinating": "a", "optimistic": "an",
            "humorous": "a", "impolite": "an", "apathetic": "an"}
DATA = Path(__file__).resolve().parents[1] / "personavec" / "data"


def _norm(q: str) -> str:
    return " ".join(q.split()).casefold()


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


# --- built-ins ---------------------------------------------------------------

def test_list_traits() -> None:
    assert list_traits() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_with_counts(name: str) -> None:
    t = load_trait(name)
    assert t.name == name and t.source == f"builtin:{name}"
    assert t.article == ARTICLES[name]
    assert len(t.instructions) == 5 and len(t.extract_questions) == 20 and len(t.eval_questions) == 20
    qs = [_norm(q) for q in t.extract_questions + t.eval_questions]
    assert len(set(qs)) == 40
    assert "{question}" in t.rubric and "{answer}" in t.rubric
    assert "Respond with a number between 0 and 100 and nothing else." in t.rubric
    assert len(t.rubric.split()) < 250
    assert "\n" not in t.description


@pytest.mark.parametrize("name", BUILTINS)
def test_system_prompts_exact(name: str) -> None:
    t = load_trait(name)
    for i, (pos, neg) in enumerate(t.instructions):
        assert t.system_prompt(i, "pos") == f"You are {ARTICLES[name]} {name} assistant. {pos}"
        assert t.system_prompt(i, "neg") == f"You are a helpful assistant. {neg}"
    with pytest.raises(ValueError):
        t.system_prompt(0, "both")  # type: ignore[arg-type]


def test_round_trip_and_frozen(tmp_path: Path) -> None:
    t = load_trait("optimistic")
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(t.to_dict()), encoding="utf-8")
    u = load_trait(str(path))
    assert u.to_dict() == t.to_dict() and u.source == str(path)
    with pytest.raises(AttributeError):
        t.name = "x"  # type: ignore[misc]


def test_rubric_prompt_braces_are_literal() -> None:
    t = load_trait("evil")
    q, a = "What is {x}? {answer}", 'def f(): return {"k": 1} {question} {0}'
    out = t.rubric_prompt(q, a)
    assert q in out and a in out
    assert "{question}" not in out.replace(a, "")
    assert out.count(q) == 1 and out.count(a) == 1


# --- validation errors -------------------------------------------------------

def _good() -> dict[str, Any]:
    return load_trait("humorous").to_dict()


def _mut(fn) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    d = copy.deepcopy(_good())
    fn(d)
    return d


CASES: list[tuple[str, Any, str]] = [
    ("missing_field", lambda d: d.pop("rubric"), 'missing field "rubric"'),
    ("missing_split", lambda d: d["questions"].pop("eval"), 'missing field "questions.eval"'),
    ("missing_neg", lambda d: d["instructions"][2].pop("neg"), 'missing field "instructions[2].neg"'),
    ("wrong_type_name", lambda d: d.update(name=3), '"name" must be a string'),
    ("wrong_type_instructions", lambda d: d.update(instructions="x"), '"instructions" must be a list'),
    ("wrong_type_questions", lambda d: d.update(questions=[]), '"questions" must be an object'),
    ("wrong_type_extract", lambda d: d["questions"].update(extract="q"), '"questions.extract" must be a list'),
    ("wrong_type_pair", lambda d: d["instructions"].__setitem__(0, ["a", "b"]), '"instructions[0]" must be an object'),
    ("wrong_type_question", lambda d: d["questions"]["eval"].__setitem__(4, 7), '"questions.eval[4]" must be a string'),
    ("few_extract", lambda d: d["questions"]["extract"].pop(), '"questions.extract" has 19 questions, need 20'),
    ("many_eval", lambda d: d["questions"]["eval"].append("A brand new question?"), '"questions.eval" has 21 questions, need 20'),
    ("few_pairs", lambda d: d["instructions"].pop(), '"instructions" has 4 pairs, need 5'),
    ("dup_within", lambda d: d["questions"]["extract"].__setitem__(5, d["questions"]["extract"][0]), '"questions.extract[5]" repeats "questions.extract[0]"'),
    ("dup_across", lambda d: d["questions"]["eval"].__setitem__(3, "  " + d["questions"]["extract"][7].upper() + " "), '"questions.eval[3]" repeats "questions.extract[7]"'),
    ("rubric_no_question", lambda d: d.update(rubric=d["rubric"].replace("{question}", "Q")), '"rubric" lacks the {question} placeholder'),
    ("rubric_no_answer", lambda d: d.update(rubric=d["rubric"].replace("{answer}", "A")), '"rubric" lacks the {answer} placeholder'),
    ("empty_description", lambda d: d.update(description="   "), '"description" is empty'),
    ("empty_pos", lambda d: d["instructions"][1].update(pos=""), '"instructions[1].pos" is empty'),
    ("empty_question", lambda d: d["questions"]["extract"].__setitem__(9, ""), '"questions.extract[9]" is empty'),
    ("bad_article", lambda d: d.update(article="the"), '"article" must be "a" or "an"'),
]


@pytest.mark.parametrize("case,fn,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_trait_file(tmp_path: Path, case: str, fn: Any, expected: str) -> None:
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(_mut(fn), indent=2), encoding="utf-8")
    with pytest.raises(PersonavecError) as exc:
        load_trait(str(path))
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg


def test_not_json_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  "adjective": oops\n}\n', encoding="utf-8")
    with pytest.raises(PersonavecError, match=r"broken\.json: not valid JSON at line 3"):
        load_trait(str(path))


def test_top_level_not_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(PersonavecError, match=r"list\.json: top level must be a JSON object"):
        load_trait(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PersonavecError, match=r"nope\.json: trait file not found"):
        load_trait(str(tmp_path / "nope.json"))


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(PersonavecError) as exc:
        load_trait("grumpy")
    assert "'grumpy'" in str(exc.value) and all(n in str(exc.value) for n in BUILTINS)


def test_validate_trait_directly() -> None:
    t = validate_trait(_good(), "mine.json")
    assert isinstance(t, Trait) and t.source == "mine.json"
    with pytest.raises(PersonavecError, match=r"^mine\.json: missing field"):
        validate_trait({}, "mine.json")


# --- calibration and capability data -----------------------------------------

def test_judge_calibration() -> None:
    rows = _jsonl("judge_calibration.jsonl")
    assert Counter(r["trait"] for r in rows) == {n: 12 for n in BUILTINS}
    for name in BUILTINS:
        mine = [r for r in rows if r["trait"] == name]
        assert Counter(r["label"] for r in mine) == {0: 6, 1: 6}
        t = load_trait(name)
        own = {_norm(q) for q in t.extract_questions + t.eval_questions}
        for r in mine:
            assert set(r) == {"trait", "question", "answer", "label"}
            assert r["question"].strip() and r["answer"].strip()
            assert _norm(r["question"]) not in own, r["question"]
    assert len({(r["trait"], r["answer"]) for r in rows}) == len(rows)


def test_capability_mc() -> None:
    rows = _jsonl("capability_mc.jsonl")
    assert len(rows) >= 64
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({_norm(r["question"]) for r in rows}) == len(rows)
    for r in rows:
        assert set(r["choices"]) == set("ABCD") and r["answer"] in "ABCD" and len(r["answer"]) == 1
        assert len({_norm(c) for c in r["choices"].values()}) == 4, r["id"]
    counts = Counter(r["answer"] for r in rows)
    assert len(set(counts.values())) == 1 and set(counts) == set("ABCD")


# --- CLI ---------------------------------------------------------------------

@pytest.fixture()
def cli() -> tuple[CliRunner, typer.Typer]:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Keeps `traits` a sub-command rather than the whole app."""

    register(app)
    return CliRunner(), app


def test_cli_list(cli: tuple[CliRunner, typer.Typer]) -> None:
    runner, app = cli
    res = runner.invoke(app, ["traits", "list"])
    assert res.exit_code == 0, res.output
    assert all(n in res.output for n in BUILTINS)


def test_cli_show(cli: tuple[CliRunner, typer.Typer], tmp_path: Path) -> None:
    runner, app = cli
    res = runner.invoke(app, ["traits", "show", "evil"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == load_trait("evil").to_dict()
    path = tmp_path / "mine.json"
    path.write_text(res.output, encoding="utf-8")
    assert json.loads(runner.invoke(app, ["traits", "show", str(path)]).output)["name"] == "evil"


def test_cli_show_unknown(cli: tuple[CliRunner, typer.Typer]) -> None:
    runner, app = cli
    res = runner.invoke(app, ["traits", "show", "grumpy"])
    assert res.exit_code != 0
    assert isinstance(res.exception, PersonavecError)
