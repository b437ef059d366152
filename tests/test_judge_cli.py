"""`personavec judge` and `personavec judge-check` end to end, on a tiny local judge saved to a folder."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from personavec.cli.judge import register
from personavec.errors import PersonavecError
from tiny import save_tiny

app = typer.Typer()
register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def judge_spec(tmp_path_factory):
    return "local:" + save_tiny(tmp_path_factory.mktemp("tiny-judge"))


def _chats(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHATS = [
    {"id": 1, "messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi, how are you?"},
                           {"role": "assistant", "content": "Fine, thanks."}]},
    {"id": 2, "messages": [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "One."},
                           {"role": "user", "content": "Second?"}, {"role": "assistant", "content": "Two."}]},
]


def test_judge_writes_scores_and_reruns_from_cache(tmp_path, judge_spec):
    src = _chats(tmp_path / "in.jsonl", CHATS)
    out = tmp_path / "out.jsonl"
    args = ["judge", "--judge", judge_spec, "--trait", "impolite", "--input", str(src), "--output", str(out),
            "--cache", str(tmp_path / "cache.sqlite")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and rows[1]["messages"] == CHATS[1]["messages"]
    for r in rows:
        assert set(r["judge"]) == {"trait_score", "coherence", "scheme"} and r["judge"]["scheme"] == "score100"
        assert all(r["judge"][k] is None or 0 <= r["judge"][k] <= 100 for k in ("trait_score", "coherence"))
    assert "4 new judge calls" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 new judge calls, 4 cached" in again.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert not list(tmp_path.glob("*.partial"))


def test_judge_uses_the_last_user_message_as_question(tmp_path, judge_spec, monkeypatch):
    import personavec.judge as judge_mod

    seen = []
    real = judge_mod.judge_answers

    def spy(judge, trait, items, **kw):
        seen.extend(items)
        return real(judge, trait, items, **kw)

    monkeypatch.setattr(judge_mod, "judge_answers", spy)
    src = _chats(tmp_path / "in.jsonl", CHATS[1:])
    result = runner.invoke(app, ["judge", "--judge", judge_spec, "--trait", "evil", "--input", str(src),
                                 "--output", str(tmp_path / "o.jsonl"), "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 0, result.output
    assert seen == [("Second?", "Two.")]


@pytest.mark.parametrize("bad,where", [
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n', ":2"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
     '{"messages": [{"role": "user", "content": "only a question"}]}\n', ":2"),
])
def test_judge_input_errors_name_file_and_line(tmp_path, judge_spec, bad, where):
    src = tmp_path / "in.jsonl"
    src.write_text(bad)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["judge", "--judge", judge_spec, "--trait", "evil", "--input", str(src),
                                 "--output", str(out), "--cache", str(tmp_path / "c.sqlite")])
    assert isinstance(result.exception, PersonavecError)
    message = str(result.exception)
    assert f"{src}{where}" in message and "\n" not in message
    assert not out.exists()


def test_judge_none_is_an_error(tmp_path):
    src = _chats(tmp_path / "in.jsonl", CHATS)
    result = runner.invoke(app, ["judge", "--judge", "none", "--trait", "evil", "--input", str(src),
                                 "--output", str(tmp_path / "o.jsonl")])
    assert isinstance(result.exception, PersonavecError) and "needs a judge" in str(result.exception)


def test_judge_check_prints_table_and_saves(tmp_path, judge_spec):
    from personavec.calibration import read_calibration

    save = tmp_path / "cal.json"
    result = runner.invoke(app, ["judge-check", "--judge", judge_spec, "--traits", "impolite,evil",
                                 "--save", str(save), "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 0, result.output
    assert "impolite" in result.output and "AUROC" in result.output and "threshold" in result.output
    cal = read_calibration(save)
    assert cal["judge"] == judge_spec and set(cal["traits"]) == {"impolite", "evil"}
    entry = cal["traits"]["evil"]
    assert entry["n"] == 12 and {"auroc", "threshold", "pos_range", "neg_range"} <= set(entry)


def test_judge_check_unknown_trait(tmp_path, judge_spec):
    result = runner.invoke(app, ["judge-check", "--judge", judge_spec, "--traits", "grumpy"])
    assert isinstance(result.exception, PersonavecError) and "grumpy" in str(result.exception)
