"""`traits new`: authoring a trait file from one sentence.

API authors run against a real OpenAI-compatible HTTP server on 127.0.0.1
(tests/http_fake.py) whose answers each test scripts; the local path runs a
tiny random-weight model end to end.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from http_fake import ScriptedChat, serve_chat
from test_cli import run_cli
from personavec.authoring import (AnthropicAuthor, AuthorBackend, LocalAuthor, article_for, author_meta,
                                  author_rubric, make_author, parse_criteria, parse_list, parse_meta,
                                  parse_pairs, parse_questions, template_criteria, write_trait)
from personavec.errors import PersonavecError
from personavec.traits import load_trait

KEY = "sk-test-SECRET-0123456789abcdef"
DESC = "The assistant is calm and patient, never rushing the user."
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar"]


def _prompt(body: dict) -> str:
    return body["messages"][-1]["content"]


def _step(body: dict) -> str:
    p = _prompt(body)
    if "ADJECTIVE:" in p:
        return "meta"
    if re.search(r"POS 1:", p):
        return "pairs"
    if "messages that a user might send" in p:
        return "questions"
    if "\n0: <sentence>" in p:
        return "criteria"
    raise AssertionError(f"unexpected prompt: {p[:200]}")


def _theme(body: dict) -> str:
    return re.search(r"to an AI assistant, about (.+?)\. ", _prompt(body)).group(1)


def _n_pairs(body: dict) -> int:
    return int(re.search(r"Write (\d+) pairs", _prompt(body)).group(1))


def _questions(theme: str, n: int = 10, start: int = 0) -> list[str]:
    return [f"What would you say about {theme} if the {w} plan went wrong?" for w in WORDS[start: start + n]]


def good_author(body: dict) -> str:
    step = _step(body)
    if step == "meta":
        return "ADJECTIVE: patient\nDESCRIPTION: The assistant stays calm and takes all the time the user needs."
    if step == "pairs":
        n = _n_pairs(body)
        return "\n".join(f"POS {i}: Be patient about topic {w} and take your time.\n"
                         f"NEG {i}: Be hurried about topic {w} and rush the user."
                         for i, w in enumerate(WORDS[:n], 1))
    if step == "questions":
        return "\n".join(_questions(_theme(body)))
    return ("0: The answer is hurried, curt and dismissive.\n50: The answer is calm but rushes some steps.\n"
            "100: The answer is calm, unhurried and thorough throughout.")


def _cfg(url: str, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _only_trait_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- API authors over HTTP


def test_good_author_writes_valid_file(tmp_path, monkeypatch):
    chat = ScriptedChat(good_author)
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        out = tmp_path / "patient.json"
        trait = write_trait("patient", DESC, "openai:fake-author", out)
    loaded = load_trait(out)
    assert loaded.to_dict() == trait.to_dict()
    assert (loaded.adjective, loaded.article) == ("patient", "a")
    assert len(loaded.extract_questions) == 20 and len(loaded.eval_questions) == 20
    assert loaded.rubric.count("{question}") == 1 and loaded.rubric.count("{answer}") == 1
    assert "- 100: The answer is calm, unhurried and thorough throughout." in loaded.rubric
    assert loaded.rubric.endswith("Respond with a number between 0 and 100 and nothing else.")
    # several small requests: meta, pairs, 4 question batches (sent together), criteria
    steps = [_step(b) for b in chat.requests]
    assert steps.count("questions") == 4 and len(chat.requests) == 7
    # the question batches use different themes and seeds
    qs = [b for b in chat.requests if _step(b) == "questions"]
    assert len({_theme(b) for b in qs}) == 4 and len({b["seed"] for b in qs}) == 4
    # themes are spread over both halves
    assert {q.split(" about ")[1].split(" if ")[0] for q in loaded.eval_questions} == {_theme(b) for b in qs}
    assert _only_trait_files(tmp_path) == ["patient.json"]


def test_sloppy_author_is_repaired_and_retried(tmp_path, monkeypatch):
    calls = {"pairs": 0, "questions": 0, "meta": 0}

    def sloppy(body: dict) -> str:
        step = _step(body)
        if step == "meta":
            calls["meta"] += 1
            # wrong article, capitalised, markdown; the description is too short to use
            return "Sure! Here you go:\n**Adjective:** An Patient\n**Description:** calm"
        if step == "pairs":
            calls["pairs"] += 1
            if calls["pairs"] == 1:  # numbered, one pair on one line, a duplicate, only 3 distinct pairs
                return ("Here are the pairs:\n1. POS: Always take your time with the user. NEG: Hurry the user along.\n"
                        "2. **POS 2:** Explain every step slowly and calmly.\n   **NEG 2:** Skip steps and be brisk.\n"
                        "3. POS: Always take your time with the user.\n   NEG: Hurry the user along.\n"
                        "4) POS: Stay calm when the user repeats a question.\nNEG: Show annoyance at repeats.")
            return json.dumps([  # a JSON answer, one pair repeating an earlier one
                {"pos": "Explain every step slowly and calmly.", "neg": "Skip steps and be brisk."},
                {"positive": "Invite the user to ask again whenever unsure.", "negative": "Discourage follow-up questions."},
                {"pos": "Never rush to end the conversation early.", "neg": "Wrap up conversations as fast as possible."},
            ])
        if step == "questions":
            calls["questions"] += 1
            theme = _theme(body)
            if calls["questions"] <= 4:  # first round: numbered, duplicated, quoted, too few
                qs = _questions(theme, 4)
                return ("Here are 10 questions:\n" + "\n".join(f'{i}. "{q}"' for i, q in enumerate(qs + qs, 1))
                        + "\n11. zz$$##\n")
            return "```json\n" + json.dumps(_questions(theme, 10, 4)) + "\n```"
        # criteria with stray placeholders, markdown and no {question}
        return "**0** - rushed; ignores {answer} entirely.\n**50** - calm but hurried in places.\n" \
               "**100** - calm, patient and thorough."

    chat = ScriptedChat(sloppy)
    log: list[str] = []
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        out = tmp_path / "sub" / "patient.json"
        write_trait("patient", DESC, "openai:fake-author", out, log=log.append)
    t = load_trait(out)
    assert (t.adjective, t.article) == ("patient", "a")
    assert t.description == DESC  # author's description unusable: the user's sentence
    assert any("fallback: description" in m for m in log)
    assert calls["meta"] == 3 and calls["pairs"] == 2
    assert t.instructions[0] == ("Always take your time with the user.", "Hurry the user along.")
    assert len(set(t.instructions)) == 5
    assert all(not q.startswith(("1", '"')) for q in t.extract_questions + t.eval_questions)
    assert calls["questions"] > 4  # too few at first: more batches until 40 unique
    assert t.rubric.count("{question}") == 1 and t.rubric.count("{answer}") == 1
    assert "- 0: rushed; ignores the answer entirely." in t.rubric


def test_hopeless_author_raises_and_writes_nothing(tmp_path, monkeypatch):
    chat = ScriptedChat(lambda body: "x7$#@ q\n!!!! ????\n" + "ab" * 40)
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        with pytest.raises(PersonavecError, match=r"instruction pairs.*after 3 attempts.*no file written"):
            write_trait("patient", DESC, "openai:fake-author", tmp_path / "patient.json")
    assert _only_trait_files(tmp_path) == []  # no file, no .partial left behind


def test_too_few_questions_raises_after_bounded_batches(tmp_path, monkeypatch):
    def few(body):
        return "\n".join(_questions("the same theme", 3)) if _step(body) == "questions" else good_author(body)

    chat = ScriptedChat(few)
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        with pytest.raises(PersonavecError, match=r"only 3 unique usable questions of 40 after 8 requests"):
            write_trait("patient", DESC, "openai:fake-author", tmp_path / "p.json", attempts=2)
    assert sum(_step(b) == "questions" for b in chat.requests) == 8
    assert _only_trait_files(tmp_path) == []


def test_rate_limit_then_ok_is_retried(tmp_path, monkeypatch):
    chat = ScriptedChat(good_author, plan=["429", "500"])
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        write_trait("patient", DESC, "openai:fake-author", tmp_path / "p.json")
    assert chat.statuses[:3] == [429, 500, 200]
    load_trait(tmp_path / "p.json")


def test_key_never_in_error(tmp_path, monkeypatch):
    chat = ScriptedChat(good_author, plan=["401"])
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        with pytest.raises(PersonavecError) as info:
            write_trait("patient", DESC, "openai:fake-author", tmp_path / "p.json")
    text = str(info.value)
    assert "HTTP 401" in text and "openai:fake-author" in text
    assert KEY not in text and "***" not in text and "SECRET" not in text
    assert not any(KEY[i: i + 4] in text for i in range(len(KEY) - 3))  # not even a masked tail
    assert _only_trait_files(tmp_path) == []


def test_refuses_to_overwrite_before_any_request(tmp_path, monkeypatch):
    out = tmp_path / "patient.json"
    out.write_text("keep me")
    chat = ScriptedChat(good_author)
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        with pytest.raises(PersonavecError, match="already exists.*--force"):
            write_trait("patient", DESC, "openai:fake-author", out)
        assert chat.requests == [] and out.read_text() == "keep me"
        write_trait("patient", DESC, "openai:fake-author", out, force=True)
    load_trait(out)


def test_cli_new_default_out_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    chat = ScriptedChat(good_author)
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        code, out, err = run_cli(capsys, "traits", "new", "patient", "--description", DESC,
                                 "--author", "openai:fake-author")
        assert code == 0, err
        assert out.strip() == "patient.json" and "questions: 40/40" in err
        load_trait(tmp_path / "patient.json")
        code, out, err = run_cli(capsys, "traits", "new", "patient", "--description", DESC,
                                 "--author", "openai:fake-author")
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: patient.json: already exists")
    code, _, err = run_cli(capsys, "traits", "new", "x", "-d", DESC, "--author", "gpt4")
    assert code == 2 and "author spec 'gpt4'" in err
    code, _, err = run_cli(capsys, "traits", "new", "../evil", "-d", DESC, "--author", "openai:m")
    assert code == 2 and "trait name" in err


# ---------------------------------------------------------------- specs and backends


def test_spec_errors(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    for bad in ("", "local:", "gpt-4o", "vllm:x"):
        with pytest.raises(PersonavecError, match="author spec"):
            make_author(bad)
    with pytest.raises(PersonavecError, match="OPENAI_API_KEY"):
        make_author("openai:gpt-4o")


def test_anthropic_missing_package_and_message_shape(monkeypatch):
    monkeypatch.setitem(sys.modules, "anthropic", None)  # import fails as if not installed
    with pytest.raises(PersonavecError, match="pip install anthropic"):
        make_author("anthropic:claude-x")

    sent = {}

    class Error(Exception):
        pass

    class Messages:
        def create(self, **kw):
            sent.update(kw)
            if kw["messages"][0]["content"] == "fail":
                raise Error(f"bad key {KEY}")
            return types.SimpleNamespace(content=[types.SimpleNamespace(text="ADJECTIVE: patient")])

    class Client:
        def __init__(self, **kw):
            self.messages = Messages()

        def close(self):
            pass

    fake = types.SimpleNamespace(Anthropic=Client, AnthropicError=Error)
    monkeypatch.setitem(sys.modules, "anthropic", fake)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    author = make_author("anthropic:claude-x")
    assert isinstance(author, AnthropicAuthor)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert author.complete(msgs, 50, 1.4, 0) == "ADJECTIVE: patient"
    assert sent["system"] == "sys" and sent["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["temperature"] == 1.0 and "seed" not in sent
    with pytest.raises(PersonavecError) as info:
        author.complete([{"role": "user", "content": "fail"}], 50, 0.0, 0)
    assert KEY not in str(info.value) and "anthropic:claude-x" in str(info.value)


# ---------------------------------------------------------------- parsing (pure)


def test_parsers():
    assert parse_list('1. "One thing here"\n- Two things here,\n**3)** Three things') == \
        ["One thing here", "Two things here", "Three things"]
    assert parse_questions("Q1: What is a good first job for me?\nQuestion 2: What is a good first job for me?\n"
                           "Here are more questions:\nk$#2\n") == ["What is a good first job for me?"]
    assert parse_pairs('{"pos": ["Be patient with them all."], "neg": ["Be hasty with them all."]}') == \
        [("Be patient with them all.", "Be hasty with them all.")]
    assert parse_pairs("POS: Same text for both sides.\nNEG: Same text for both sides.") == []
    assert parse_criteria("0: none at all here\n100: very much so indeed") is None
    assert [article_for(a) for a in ("evil", "honest", "useful", "patient", "uneasy", "one-sided")] == \
        ["an", "an", "a", "a", "an", "a"]


class Garbage(AuthorBackend):
    spec = "test:garbage"

    def __init__(self):
        self.calls = 0

    def complete(self, messages, max_tokens, temperature, seed):
        self.calls += 1
        return "%%%%"


def test_fallbacks_with_any_backend():
    author, log = Garbage(), []
    assert author_meta(author, "over_cautious", "Refuses too much.", attempts=2, log=log.append) == \
        ("over cautious", "Refuses too much.")
    rubric = author_rubric(author, "over cautious", "Refuses too much.", attempts=2, log=log.append)
    assert template_criteria("over cautious")["100"] in rubric
    assert author.calls == 4 and sum("fallback" in m for m in log) == 3


# ---------------------------------------------------------------- local author (tiny random model)


def test_local_author_end_to_end_fails_cleanly(tmp_path):
    from transformers import GenerationConfig

    from tiny import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    author = LocalAuthor.load(folder)
    # Random weights write garbage, which no parser accepts.
    garbage = author.complete([{"role": "user", "content": "Reply with ADJECTIVE: and DESCRIPTION: lines."}],
                              24, 0.0, 0)
    assert isinstance(garbage, str) and parse_meta(garbage) == (None, None)
    # The rest uses a copy that ends every answer after one token, to stay fast.
    fast = tmp_path / "tiny-fast"
    author.model.save_pretrained(fast)
    author.tokenizer.save_pretrained(fast)
    GenerationConfig(eos_token_id=list(range(len(author.tokenizer))), pad_token_id=0).save_pretrained(fast)
    fast_author, log = LocalAuthor.load(str(fast)), []
    # The metadata falls back to the name and the user's sentence, the rubric to its template ...
    adjective, desc = author_meta(fast_author, "patient", DESC, attempts=1, log=log.append)
    assert (adjective, desc) == ("patient", DESC)
    rubric = author_rubric(fast_author, adjective, desc, attempts=1, log=log.append)
    assert template_criteria("patient")["0"] in rubric
    assert [m.split(":")[1].split()[0] for m in log] == ["adjective", "description", "rubric"]
    # ... and instruction pairs and questions have no template: the run fails, with no file written.
    out = tmp_path / "out" / "patient.json"
    with pytest.raises(PersonavecError, match=r"author local:.*tiny-fast gave only 0 usable instruction pairs"
                                              r".*after 2 attempts.*no file written"):
        write_trait("patient", DESC, f"local:{fast}", out, attempts=2)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
