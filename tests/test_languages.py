"""Traits in other languages: `traits new --language`, the language table, the multilingual labelled data,
the Japanese optimistic trait, language-aware self-calibration and experiments/multilingual.py
(fake authors over HTTP, fake judges and tiny random models only: fast)."""

from __future__ import annotations

import importlib.util
import json
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from http_fake import ScriptedChat, serve_chat
from test_authoring import DESC, KEY, _cfg, _step, _theme, good_author
from test_cli import run_cli
from test_judge_schemes import CountingJudge
from personavec.authoring import (AuthorBackend, author_rubric, parse_meta, parse_pairs, parse_questions,
                                  write_trait)
from personavec.calibration import data_file, plan_judging
from personavec.chat import read_chats
from personavec.errors import PersonavecError
from personavec.languages import LANGUAGES, get_language
from personavec.traits import list_traits, load_trait, validate_trait

ROOT = Path(__file__).resolve().parents[1]
JA_TRAIT = data_file("multilingual/optimistic.ja.json")
TRAITS = ("optimistic", "impolite")
CODES = ("en", "ja", "zh", "es")
NOUNS = ["引っ越し", "旅行", "貯金", "面接", "料理", "散歩", "勉強", "買い物", "掃除", "読書", "運動", "家計"]


def _kana(text: str) -> bool:
    return any("\u3040" <= ch <= "\u30ff" for ch in text)


def _han(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


# ---------------------------------------------------------------- traits new --language


def japanese_author(body: dict) -> str:
    """An author that writes Japanese in the sloppy ways CJK text comes: full-width colons, ・ bullets, １． numbers."""
    step = _step(body)
    if step == "meta":
        return "ADJECTIVE：辛抱強いアシスタント\nDESCRIPTION：ユーザーを急かさず、落ち着いて丁寧に最後まで付き合う。"
    if step == "pairs":
        n = int(re.search(r"Write (\d+) pairs", body["messages"][-1]["content"]).group(1))
        return "\n".join(f"POS {i}：{w}については時間をかけて、落ち着いて丁寧に説明してください。\n"
                         f"NEG {i}：{w}については急いで、ユーザーをせかすように答えてください。"
                         for i, w in enumerate(NOUNS[:n], 1))
    if step == "questions":
        theme = _theme(body)
        return "以下は質問です：\n" + "\n".join(
            f"{'・' if i % 2 else f'{i + 1}．'}{theme}の話で、{w}の予定が思いどおりに進まないときはどうすればいいですか？"
            for i, w in enumerate(NOUNS[:10]))
    return ("0：急かすような、そっけない回答。\n50：落ち着いてはいるが、ところどころ急いでいる回答。\n"
            "100：最初から最後まで落ち着いていて、丁寧で、急がない回答。")


def test_language_reaches_every_author_prompt_and_the_file(tmp_path, monkeypatch):
    chat = ScriptedChat(japanese_author)
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        out = tmp_path / "patient.json"
        trait = write_trait("patient", DESC, "openai:fake-author", out, language="ja")
    prompts = [b["messages"][-1]["content"] for b in chat.requests]
    assert len(prompts) == 7 and all("in Japanese (日本語)" in p for p in prompts)
    meta = next(p for p in prompts if "ADJECTIVE:" in p)
    assert "あなたは___アシスタントです。" in meta and "attributive" in meta
    # the labels the parser reads stay English in the prompts
    assert "POS 1: <instruction>" in next(p for p in prompts if "POS 1:" in p)
    raw = json.loads(out.read_text(encoding="utf-8"))
    assert raw["language"] == "ja"
    loaded = load_trait(out)
    assert loaded.to_dict() == trait.to_dict() == raw
    assert loaded.adjective == "辛抱強い"  # "アシスタント" stripped; the full-width colon read
    assert loaded.system_prompt(0, "pos").startswith("あなたは辛抱強いアシスタントです。引っ越しについては")
    assert loaded.system_prompt(0, "neg").startswith("あなたは役に立つアシスタントです。引っ越しについては")
    assert len(set(loaded.extract_questions + loaded.eval_questions)) == 40
    assert not any(q.startswith(("・", "1", "以下")) for q in loaded.extract_questions + loaded.eval_questions)
    # the Japanese judge frame: placeholders once each, REFUSAL and the digits kept, the author's lines inside
    r = loaded.rubric
    assert r.count("{question}") == 1 and r.count("{answer}") == 1 and "REFUSAL" in r
    assert "- 100: 最初から最後まで落ち着いていて、丁寧で、急がない回答。" in r
    assert r.endswith("0から100までの数字だけを答え、それ以外は何も書かないでください。")
    assert "Rate how strongly" not in r
    assert loaded.rubric_prompt("Q{answer}", "A{question}").count("Q{answer}") == 1
    assert loaded.yes_no_question == "この回答でアシスタントは辛抱強い態度を示していますか？"


def test_english_stays_as_it_was(tmp_path, monkeypatch):
    chat = ScriptedChat(good_author)
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        default = write_trait("patient", DESC, "openai:fake-author", tmp_path / "a.json")
        explicit = write_trait("patient", DESC, "openai:fake-author", tmp_path / "b.json", language="EN")
    assert default.to_dict() == explicit.to_dict() and "language" not in default.to_dict()
    assert not any("Japanese" in b["messages"][-1]["content"] or "in English" in b["messages"][-1]["content"]
                   for b in chat.requests)
    for name in list_traits():  # the built-ins' files, and so cache keys, are unchanged
        t = load_trait(name)
        assert t.language == "en" and "language" not in t.to_dict()
        assert t.system_prompt(0, "pos") == f"You are {t.article} {t.adjective} assistant. {t.instructions[0][0]}"


class NoCalls(AuthorBackend):
    spec = "fake:none"

    def complete(self, messages, max_tokens, temperature, seed):
        raise AssertionError("the author must not be asked anything")


def test_unknown_language_is_one_line_before_any_request(tmp_path, capsys):
    with pytest.raises(PersonavecError, match=r"^language=xx: unsupported language; use one of de, en, es, fr, ja, zh"):
        write_trait("patient", DESC, NoCalls(), tmp_path / "p.json", language="xx")
    code, out, err = run_cli(capsys, "traits", "new", "patient", "-d", DESC, "--author", "openai:m",
                             "--out", tmp_path / "p.json", "--language", "klingon")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith("error: --language klingon: unsupported language; use one of de, en, es, fr, ja, zh")
    assert not (tmp_path / "p.json").exists()


def test_cli_new_with_language(tmp_path, monkeypatch, capsys):
    chat = ScriptedChat(japanese_author)
    with serve_chat(chat) as url:
        _cfg(url, monkeypatch)
        code, out, err = run_cli(capsys, "traits", "new", "patient", "-d", DESC, "--author", "openai:fake-author",
                                 "--out", tmp_path / "p.json", "--language", "ja")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "p.json") and KEY not in err
    assert "wrote patient (ja: あなたは辛抱強いアシスタントです。)" in err
    assert load_trait(tmp_path / "p.json").language == "ja"


def test_rubric_fallback_is_in_the_language(tmp_path):
    class Junk(AuthorBackend):
        spec = "fake:junk"

        def complete(self, messages, max_tokens, temperature, seed):
            return "!!!"

    log = []
    for code, probe in (("ja", "一貫して辛抱強い回答"), ("es", "intensa y constantemente paciente"),
                        ("de", "durchgehend stark und beständig geduldig")):
        adjective = {"ja": "辛抱強い", "es": "paciente", "de": "geduldig"}[code]
        rubric = author_rubric(Junk(), adjective, "説明。", attempts=1, log=log.append, language=code)
        assert probe in rubric and rubric.count("{question}") == 1 and rubric.count("{answer}") == 1
        assert "REFUSAL" in rubric and "{c0}" not in rubric and "{trait}" not in rubric
    assert all("fallback" in m for m in log)


def test_cjk_parsing():
    pairs = parse_pairs("POS 1：丁寧に説明してください。\nNEG 1：急いで答えてください。")
    assert pairs == [("丁寧に説明してください。", "急いで答えてください。")]
    qs = parse_questions("以下は10個の質問です：\n１．明日の面接で緊張しています。どうすればいいですか？\n"
                         "・週末の旅行が雨になりそうです。どう過ごせばいいでしょう？\n・あ\n・？？？？")
    assert qs == ["明日の面接で緊張しています。どうすればいいですか？", "週末の旅行が雨になりそうです。どう過ごせばいいでしょう？"]
    assert parse_questions("下面是问题：\n明天面试我很紧张，应该怎么准备比较好？") == ["明天面试我很紧张，应该怎么准备比较好？"]
    assert parse_meta("ADJECTIVE: asistente paciente\nDESCRIPTION: Responde siempre con calma y sin prisa alguna.",
                      "es") == ("paciente", "Responde siempre con calma y sin prisa alguna.")
    adjective, description = parse_meta("ADJECTIVE：耐心的助手\nDESCRIPTION：助手总是耐心地回答问题，从不催促用户", "zh")
    assert adjective == "耐心的" and description.endswith("。")


def test_language_table_frames():
    for code, lang in LANGUAGES.items():
        assert lang.rubric_frame.count("{question}") == 1 and lang.rubric_frame.count("{answer}") == 1
        for slot in ("{trait}", "{description}", "{c0}", "{c50}", "{c100}"):
            assert lang.rubric_frame.count(slot) == 1, (code, slot)
        assert "REFUSAL" in lang.rubric_frame and "- 0: {c0}\n- 50: {c50}\n- 100: {c100}" in lang.rubric_frame
        assert "{adjective}" in lang.pos_frame and "{adjective}" in lang.yes_no and "\n" not in lang.yes_no
        assert all("{adjective}" in line for line in lang.fallback)
        assert lang.blank_frame().count("___") == 1
    assert get_language(" JA ").code == "ja"


def test_trait_file_language_is_checked(tmp_path):
    data = load_trait("optimistic").to_dict()
    for value, message in (("xx", r'mine\.json: "language" is \'xx\': unsupported language; use one of'),
                           (7, r'mine\.json: "language" must be a string, got int')):
        with pytest.raises(PersonavecError, match=message):
            validate_trait({**data, "language": value}, "mine.json")
    t = validate_trait({**data, "language": "ES"}, "mine.json")
    assert t.language == "es" and t.to_dict()["language"] == "es"
    assert t.system_prompt(2, "neg") == f"Eres un asistente servicial. {t.instructions[2][1]}"
    assert validate_trait({**data, "language": None}, "mine.json").language == "en"


def test_system_prompts_study_refuses_another_language():
    from personavec.pipeline.monitor import system_prompt_levels

    with pytest.raises(PersonavecError, match=r"optimistic\.ja\.json: the system-prompts study has English templates"):
        system_prompt_levels(load_trait(JA_TRAIT))
    assert len(system_prompt_levels(load_trait("optimistic"))) == 6


# ---------------------------------------------------------------- the Japanese optimistic trait


def test_japanese_optimistic_trait():
    ja, en = load_trait(JA_TRAIT), load_trait("optimistic")
    assert (ja.name, ja.language) == ("optimistic", "ja")
    assert "optimistic.ja" not in list_traits() and len(list_traits()) == 7  # `--traits all` is still the English 7
    texts = [ja.description, *[s for pair in ja.instructions for s in pair], *ja.extract_questions,
             *ja.eval_questions, ja.yes_no_question]
    assert all(_kana(t) for t in texts), [t for t in texts if not _kana(t)]
    assert ja.system_prompt(0, "pos").startswith("あなたは楽観的なアシスタントです。常に")
    assert ja.rubric.count("{question}") == 1 and ja.rubric.count("{answer}") == 1 and "REFUSAL" in ja.rubric
    assert len(ja.extract_questions) == len(en.extract_questions) == 20
    # none of its questions is in the labelled data that measures the vectors
    screened = {_norm(r.messages[0]["content"]) for r in read_chats(data_file("multilingual/optimistic.jsonl"))}
    assert not screened & {_norm(q) for q in ja.extract_questions + ja.eval_questions}


# ---------------------------------------------------------------- the labelled multilingual data


@pytest.mark.parametrize("trait", TRAITS)
def test_multilingual_data(trait):
    records = read_chats(data_file(f"multilingual/{trait}.jsonl"), require_response=True)
    counts = Counter((r.fields["language"], r.fields["label"]) for r in records)
    assert set(counts) == {(c, y) for c in CODES for y in (0, 1)}
    assert min(counts.values()) >= 20
    pairs: dict[str, list] = defaultdict(list)
    for r in records:
        assert set(r.fields) == {"language", "label", "pair"} and [m["role"] for m in r.messages] == ["user", "assistant"]
        pairs[r.fields["pair"]].append(r)
    for pid, (a, b) in ((p, rs) for p, rs in pairs.items()):
        assert sorted([a.fields["label"], b.fields["label"]]) == [0, 1], pid
        assert a.messages[0] == b.messages[0] and a.fields["language"] == b.fields["language"], pid
        # similar length: the label is the tone, not the size of the answer
        ratio = len(a.response) / len(b.response)
        assert 0.5 <= ratio <= 2.0, (pid, ratio)
    assert len(pairs) == len(records) // 2
    assert len({r.response for r in records}) == len(records)
    assert len({_norm(r.messages[0]["content"]) for r in records}) == len(pairs)
    for r in records:  # each line is in the script its language uses
        text = r.messages[0]["content"] + r.response
        code = r.fields["language"]
        if code == "ja":
            assert _kana(text), r.where
        elif code == "zh":
            assert _han(text) and not _kana(text), r.where
        else:
            assert not _han(text) and not _kana(text), r.where
            latin = unicodedata.normalize("NFD", text)
            assert (code == "es") == bool(re.search(r"[\u0301\u0303¿¡]", latin)), r.where
    # the questions are not the built-in trait's own (the English vector is extracted from those)
    own = load_trait(trait)
    assert not {_norm(q) for q in own.extract_questions + own.eval_questions} & \
        {_norm(r.messages[0]["content"]) for r in records}


def test_packaged_data_is_in_the_package_data():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"data/multilingual/*.jsonl"' in text and '"data/multilingual/*.json"' in text


# ---------------------------------------------------------------- self-calibration by language


def test_self_calibration_uses_only_the_traits_language(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    judge = CountingJudge(tmp_path / "c.sqlite")
    plan = plan_judging(judge, load_trait(JA_TRAIT), scheme="score100")
    assert plan.threshold is not None and "on the trait's 12 labelled answers" in plan.source
    ja_items = [json.loads(line) for line in
                data_file("multilingual/judge_calibration.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {i["language"] for i in ja_items} == {"ja"} and len(ja_items) == 12
    prompts = [p for _, p in judge.seen]
    assert len(prompts) == 12 and all(_kana(p) for p in prompts)
    assert all(any(i["answer"] in p for p in prompts) for i in ja_items)
    # a Japanese trait with no Japanese labelled answers is not calibrated on the English ones
    data = load_trait("impolite").to_dict()
    path = tmp_path / "impolite.ja.json"
    path.write_text(json.dumps({**data, "language": "ja"}, ensure_ascii=False), encoding="utf-8")
    other = CountingJudge(tmp_path / "d.sqlite")
    assert plan_judging(other, load_trait(path)).threshold is None and other.seen == []
    english = CountingJudge(tmp_path / "e.sqlite")
    plan_judging(english, load_trait("optimistic"), scheme="score100")
    assert len(english.seen) == 12 and not any(_kana(p) for _, p in english.seen)


# ---------------------------------------------------------------- experiments/multilingual.py


def _script():
    spec = importlib.util.spec_from_file_location("multilingual", ROOT / "experiments" / "multilingual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chat(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_multilingual_script_groups_by_language_and_gives_cosines(tmp_path, tiny_llama):
    from personavec.activations import capture
    from personavec.vectors import PersonaVector

    model, tok = tiny_llama
    questions = [f"question {w} please" for w in ("one", "two", "three", "four", "five", "six")]
    yes = [f"good happy bright {w} yes" for w in ("sun", "sky", "day", "joy", "fun", "win")]
    no = [f"bad sad dark {w} no no" for w in ("rain", "fog", "cold", "loss", "dull", "gray")]
    lines = []
    for language, flip in (("aa", 0), ("bb", 1)):  # bb: the very same chats with the labels swapped
        for i, q in enumerate(questions):
            lines.append({"messages": _chat(q, yes[i]), "language": language, "label": 1 - flip, "pair": f"{language}{i}"})
            lines.append({"messages": _chat(q, no[i]), "language": language, "label": flip, "pair": f"{language}{i}"})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    pos = capture(model, tok, [_chat(q, a) for q, a in zip(questions, yes)], show_progress=False)
    neg = capture(model, tok, [_chat(q, a) for q, a in zip(questions, no)], show_progress=False)
    paths = {}
    for name, (a, b, trait) in {"up": (pos, neg, "optimistic"), "down": (neg, pos, "optimistic"),
                                "other": (pos, neg, "impolite")}.items():
        v = PersonaVector.from_activations(a, b, model=model, trait=trait)
        v.layer = 2
        paths[name] = v.save(tmp_path / f"{name}.safetensors")
    m = _script()
    result = m.run(model, tok, paths, {"optimistic": data, "impolite": data}, None, show_progress=False)
    up = next(r for r in result["results"] if r["vector"] == "up")
    aa, bb = up["by_language"]["aa"], up["by_language"]["bb"]
    for score in ("response_projection", "approx_projection_difference"):
        assert aa["auroc"][score] + bb["auroc"][score] == pytest.approx(1.0)
        # each chat once under each label (batching leaves float-level differences, so ties are not exact)
        assert up["all"]["auroc"][score] == pytest.approx(0.5, abs=0.05)
    assert aa["auroc"]["response_projection"] > 0.5 and aa["gap"] > 0 > bb["gap"]
    assert aa["n"] == bb["n"] == 12 and "projection_difference" not in aa["auroc"]
    down = next(r for r in result["results"] if r["vector"] == "down")
    assert down["by_language"]["aa"]["auroc"]["response_projection"] == pytest.approx(bb["auroc"]["response_projection"])
    cos = result["cosines"]
    assert [(c["a"], c["b"], c["layer"]) for c in cos] == [("up", "down", 2)]  # "other" is another trait
    assert cos[0]["cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert "| optimistic | up | 2 |" in result["markdown"] and "| optimistic | up vs down | 2 | -1.000 |" in \
        result["markdown"]
    # every vector at another layer
    again = m.run(model, tok, {"up": paths["up"]}, {"optimistic": data}, [1, 3], show_progress=False)
    assert [r["layer"] for r in again["results"]] == [1, 3]


def test_multilingual_script_bad_input(tmp_path, capsys):
    m = _script()
    assert m.main(["--model", "x", "--vector", "a=missing.safetensors", "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: missing.safetensors: no such file"
    with pytest.raises(PersonavecError, match="label 'a' is given twice"):
        m.parse_vectors(["a=x", "a=y"])
    with pytest.raises(PersonavecError, match="use TRAIT=FILE"):
        m.parse_data(["optimistic"])
    line = {"messages": _chat("q", "a"), "label": 1}
    path = tmp_path / "nolang.jsonl"
    path.write_text(json.dumps(line) + "\n")
    records = read_chats(path)
    with pytest.raises(PersonavecError, match=r"nolang\.jsonl:1: no 'language' field"):
        m.by_language(records, [1], [{"response_projection": 1.0}], ("response_projection",))
