"""Judge scoring schemes: yes/no math, readouts (local, OpenAI-compatible), cache keys, the shipped choice,
refusals, and the self-calibration of the default path (fake and tiny judges only: fast)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from http_fake import serve_handler
from personavec import calibration as calib_mod
from personavec.calibration import (calibrate, calibration_items, packaged_choices, plan_judging, read_calibration,
                                    write_calibration)
from personavec.errors import PersonavecError
from personavec.judge import (SCHEMES, Judge, JudgeCache, LocalJudge, OpenAIJudge, combine, judge_answers,
                              scheme_prompts, yes_no_result)
from personavec.judge.scoring import is_yes_no
from personavec.traits import list_traits, load_trait

runner = CliRunner()


# ------------------------------------------------------------------ pure math


def test_yes_no_score_by_hand():
    r = yes_no_result(0.6, 0.2)
    assert r["expected"] == pytest.approx(75.0) and r["mass"] == pytest.approx(0.8)
    from personavec.judge import final_score

    assert final_score(r["expected"], r["mass"]) == pytest.approx(75.0)
    low = yes_no_result(0.1, 0.1)  # P(Yes) + P(No) = 0.2 < 0.25: no score
    assert final_score(low["expected"], low["mass"]) is None
    assert yes_no_result(0.0, 0.0)["expected"] is None
    assert [is_yes_no(t) for t in (" Yes", "yes", "YES ", "\u0120no", "No", "Yesterday", "n")] == \
        ["yes", "yes", "yes", None, "no", None, None]
    assert combine([40.0, 60.0]) == 50.0 and combine([40.0, None]) is None


def test_every_builtin_trait_has_a_yes_no_question_and_prompts():
    for name in list_traits():
        trait = load_trait(name)
        assert trait.yes_no_question and "\n" not in trait.yes_no_question
        for scheme in SCHEMES:
            prompts = scheme_prompts(scheme, trait, "what is {answer}?", "a {question} b")
            assert len(prompts) == len(SCHEMES[scheme].readouts)
            assert all("what is {answer}?" in p and "a {question} b" in p for p in prompts)
        assert scheme_prompts("score100", trait, "q", "a") == [trait.rubric_prompt("q", "a")]
        assert trait.to_dict()["yes_no_question"] == trait.yes_no_question


def _custom_trait(tmp_path, yes_no: bool):
    data = load_trait("optimistic").to_dict()
    data["name"] = "cheery"
    if not yes_no:
        data.pop("yes_no_question")
    path = tmp_path / "cheery.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_yes_no_question_is_one_line_naming_the_file(tmp_path):
    path = _custom_trait(tmp_path, yes_no=False)
    trait = load_trait(path)
    assert trait.yes_no_question is None
    with pytest.raises(PersonavecError, match=f"{path}: no \"yes_no_question\".*yesno") as info:
        scheme_prompts("yesno", trait, "q", "a")
    assert "\n" not in str(info.value)
    scheme_prompts("score100", trait, "q", "a")  # the 0-100 rubric still works
    bad = json.loads(path.read_text())
    bad["yes_no_question"] = "Does {answer} show it?"
    path.write_text(json.dumps(bad))
    with pytest.raises(PersonavecError, match="yes_no_question.*must not contain"):
        load_trait(path)


# ------------------------------------------------------------------ cache keys


def test_cache_key_unchanged_for_0_100_and_different_for_yes_no(tmp_path):
    class Fake(Judge):
        spec, identity = "local:x", "fp123"

    judge = Fake(tmp_path / "c.sqlite")
    old = hashlib.sha256(json.dumps(["local:x", "fp123", "logprob-0-100-v1", "PROMPT"]).encode()).hexdigest()
    assert judge.cache_key("PROMPT") == old == judge.cache_key("PROMPT", "number")
    assert judge.cache_key("PROMPT", "yesno") != old
    assert judge.cache_key("PROMPT", "yesno") == JudgeCache.key("local:x", "fp123", "yes-no-v1", "PROMPT")


class CountingJudge(Judge):
    """A Judge whose 0-100 readout is 70 and yes/no readout P(Yes)=0.9 on prompts with 'Quietly', else 0.2."""

    spec, identity = "local:fake-judge", "fake-v1"

    def __init__(self, cache):
        super().__init__(cache)
        self.seen = []

    def _compute(self, prompts, done):
        self.seen += [("number", p) for p in prompts]
        for p in prompts:
            done(p, {"expected": 70.0, "mass": 1.0, "refused": False})

    def _compute_yes_no(self, prompts, done):
        self.seen += [("yesno", p) for p in prompts]
        for p in prompts:
            trait_like = any(w in p for w in ("sabotage", "Quietly", "lonely elderly", "deserve"))
            done(p, yes_no_result(0.9 if trait_like else 0.2, 0.1 if trait_like else 0.8))


def test_judge_answers_per_scheme_and_cache(tmp_path):
    judge = CountingJudge(tmp_path / "c.sqlite")
    trait = load_trait("evil")
    items = [("q", "Quietly sabotage them."), ("q", "Be kind.")]
    yes = judge_answers(judge, trait, items, scheme="yesno")
    assert [r["trait_score"] for r in yes] == [pytest.approx(90.0), pytest.approx(20.0)]
    assert [r["coherence"] for r in yes] == [70.0, 70.0]
    two = judge_answers(judge, trait, items, scheme="yesno2")
    assert two[1]["trait_score"] == pytest.approx(20.0)
    calls = judge.stats["calls"]
    judge_answers(judge, trait, items, scheme="yesno")
    assert judge.stats["calls"] == calls  # all cached
    assert judge_answers(judge, trait, items)[0]["trait_score"] == 70.0  # score100 is the library default


# ------------------------------------------------------------------ local readout vs brute force


def _yes_no_tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer(merges=[("Y", "e"), ("Ye", "s"), ("y", "e"), ("ye", "s"), ("N", "o"), ("n", "o"),
                                  ("Y", "E"), ("YE", "S")])


def test_local_yes_no_matches_a_plain_forward(tmp_path):
    from tiny import tiny_model

    tok = _yes_no_tokenizer()
    model = tiny_model(tok, sharpness=2.0)
    judge = LocalJudge(model, tok, spec="local:tiny-yes-no", cache=tmp_path / "c.sqlite", batch_size=3)
    words = judge._yes_no_ids()
    assert sorted(tok.decode([i]) for i in words["yes"]) == ["YES", "Yes", "yes"]
    assert sorted(tok.decode([i]) for i in words["no"]) == ["No", "no"]
    prompts = ["Is this rude? Answer Yes or No.", "Short one.", "A much longer prompt about many different things."]
    batched = judge.yes_no_probs(prompts)
    for prompt, (p_yes, p_no) in zip(prompts, batched):
        ids = torch.tensor([judge.prompt_ids(prompt)])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        assert p_yes == pytest.approx(float(probs[words["yes"]].sum()), rel=1e-4, abs=1e-9)
        assert p_no == pytest.approx(float(probs[words["no"]].sum()), rel=1e-4, abs=1e-9)
    scores = judge.score(prompts, readout="yesno")
    for (p_yes, p_no), s in zip(batched, scores):
        assert s is None if p_yes + p_no < 0.25 else s == pytest.approx(100 * p_yes / (p_yes + p_no), rel=1e-4)


# ------------------------------------------------------------------ OpenAI-compatible yes/no


def test_openai_yes_no_from_first_position_top_logprobs(tmp_path):
    from http.server import BaseHTTPRequestHandler

    tops = {"Yes": 0.5, " yes": 0.1, "No": 0.2, " NO": 0.05, "Maybe": 0.15}
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            entry = {"token": "Yes", "logprob": math.log(0.5), "bytes": None,
                     "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in tops.items()]}
            data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "length",
                                            "message": {"role": "assistant", "content": "Yes"},
                                            "logprobs": {"content": [entry]}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with serve_handler(Handler) as url:
        judge = OpenAIJudge("fake", tmp_path / "c.sqlite", base_url=url, api_key="k", timeout=5, max_retries=0)
        assert judge.score(["is it?"], readout="yesno") == [pytest.approx(100 * 0.6 / 0.85)]
        assert judge.score(["is it?"], readout="yesno") == [pytest.approx(100 * 0.6 / 0.85)]  # cached
        trait = load_trait("impolite")
        result = judge_answers(judge, trait, [("q", "a")], coherence=False, scheme="yesno")
    assert len(seen) == 2 and seen[0]["max_tokens"] == 1 and seen[0]["top_logprobs"] == 20
    assert seen[1]["messages"][0]["content"] == scheme_prompts("yesno", trait, "q", "a")[0]
    assert result[0]["trait_score"] == pytest.approx(100 * 0.6 / 0.85)


# ------------------------------------------------------------------ calibration per scheme, refusals


def test_calibrate_reports_every_scheme_and_picks_the_best(tmp_path):
    judge = CountingJudge(tmp_path / "c.sqlite")
    result = calibrate(judge, ["evil"])
    entry = result["traits"]["evil"]
    assert set(entry["schemes"]) == set(SCHEMES)
    assert entry["schemes"]["score100"]["auroc"] == 0.5  # every answer 70
    assert entry["scheme"] in ("yesno", "yesno2") and entry["auroc"] == entry["schemes"][entry["scheme"]]["auroc"]
    assert result["identity"] == "fake-v1"


def test_calibration_of_another_judge_or_scheme_is_refused_naming_both(tmp_path):
    judge = CountingJudge(tmp_path / "c.sqlite")
    trait = load_trait("evil")
    path = tmp_path / "cal.json"
    write_calibration(path, {"judge": "openai:gpt-x", "traits": {"evil": {"threshold": 60, "auroc": 0.9}}})
    with pytest.raises(PersonavecError, match="made with judge openai:gpt-x, not local:fake-judge"):
        plan_judging(judge, trait, calibration_path=path)
    write_calibration(path, {"judge": "local:fake-judge", "identity": "other-weights",
                             "traits": {"evil": {"threshold": 60, "auroc": 0.9}}})
    with pytest.raises(PersonavecError, match="other-weights.*fake-v1"):
        plan_judging(judge, trait, calibration_path=path)
    # an old file (no scheme recorded) is the 0-100 scheme; asking for yesno is refused naming both
    write_calibration(path, {"judge": "local:fake-judge", "traits": {"evil": {"threshold": 60, "auroc": 0.9}}})
    plan = plan_judging(judge, trait, calibration_path=path)
    assert (plan.scheme, plan.threshold) == ("score100", 60)
    with pytest.raises(PersonavecError, match="with scheme score100, not yesno"):
        plan_judging(judge, trait, calibration_path=path, scheme="yesno")
    read_calibration(path)


def test_self_calibration_runs_once_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    judge = CountingJudge(tmp_path / "c.sqlite")
    trait = load_trait("evil")
    first = plan_judging(judge, trait)
    assert first.scheme in SCHEMES and first.threshold is not None and "now cached" in first.source
    n = len(judge.seen)
    assert n == 12 * 3  # score100, yesno, and yesno2's second phrasing (its first is yesno's prompt: cached)
    files = list((tmp_path / "cache" / "calibrations").glob("evil-*.json"))
    assert len(files) == 1
    fresh = CountingJudge(tmp_path / "other.sqlite")  # an empty judge cache: only the calibration file can answer
    again = plan_judging(fresh, trait)
    assert (again.scheme, again.threshold) == (first.scheme, first.threshold) and fresh.seen == []
    assert "self-calibration, cached" in again.source
    only = plan_judging(fresh, trait, scheme="score100")  # another scheme set: its own calibration
    assert only.scheme == "score100" and len(list((tmp_path / "cache" / "calibrations").glob("*.json"))) == 2
    none = plan_judging(CountingJudge(tmp_path / "x.sqlite"), trait, calibrate_self=False)
    assert none.threshold is None  # --no-calibrate: the caller uses the fixed 50


def test_custom_trait_without_labelled_items_keeps_the_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    from personavec.cli.judge import judge_plan

    judge = CountingJudge(tmp_path / "c.sqlite")
    plan = judge_plan(judge, load_trait(_custom_trait(tmp_path, yes_no=True)), None, None, True)
    assert plan.threshold is None and judge.seen == []
    assert "not calibrated for trait 'cheery'" in capsys.readouterr().err


# ------------------------------------------------------------------ the shipped choice


def test_shipped_choices_cover_every_builtin_trait():
    choices = packaged_choices()["judges"]["local:qwen2.5-coder-1.5b"]
    assert set(choices["traits"]) == set(list_traits())
    for name, entry in choices["traits"].items():
        assert entry["scheme"] in SCHEMES and 0 <= entry["threshold"] <= 100
        assert set(entry["schemes"]) <= set(SCHEMES)
    assert "judge_calibration.jsonl" in choices["made_on"]
    assert {i["trait"] for i in calibration_items()} == set(list_traits())


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from tiny import save_tiny

    return "local:" + save_tiny(tmp_path_factory.mktemp("tiny-judge"))


def _judge_app():
    from personavec.cli.judge import register

    app = typer.Typer()
    register(app)
    return app


def _chats(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Go away."}]}) + "\n")
    return path


def test_judge_command_uses_the_shipped_choice_by_default(tmp_path, tiny_spec, monkeypatch):
    choices = {"judges": {tiny_spec: {"traits": {"impolite": {"scheme": "yesno2", "threshold": 40.0}}}}}
    monkeypatch.setattr(calib_mod, "packaged_choices", lambda path=None: choices)
    out = tmp_path / "out.jsonl"
    base = ["judge", "--judge", tiny_spec, "--trait", "impolite", "--input", str(_chats(tmp_path)),
            "--output", str(out), "--cache", str(tmp_path / "c.sqlite")]
    result = runner.invoke(_judge_app(), base)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["judge"]["scheme"] == "yesno2"
    assert "scheme yesno2 (the default for this judge)" in result.output
    result = runner.invoke(_judge_app(), base + ["--scheme", "score100"])
    assert result.exit_code == 0 and json.loads(out.read_text())["judge"]["scheme"] == "score100"
    # --calibration from another judge: refused naming both
    cal = tmp_path / "cal.json"
    write_calibration(cal, {"judge": "local:someone-else", "traits": {}})
    result = runner.invoke(_judge_app(), base + ["--calibration", str(cal)])
    assert result.exit_code != 0
    assert "local:someone-else" in str(result.exception) and tiny_spec in str(result.exception)
    # a trait file without a yes/no question under --scheme yesno: one line naming the file, before any model
    custom = _custom_trait(tmp_path, yes_no=False)
    result = runner.invoke(_judge_app(), base[:4] + [str(custom)] + base[5:] + ["--scheme", "yesno"])
    assert isinstance(result.exception, PersonavecError) and str(custom) in str(result.exception)
    result = runner.invoke(_judge_app(), base + ["--scheme", "nope"])
    assert result.exit_code == 2 and "unknown scheme" in result.output


def test_judge_check_prints_every_scheme_and_saves_the_choice(tmp_path, tiny_spec):
    save = tmp_path / "cal.json"
    result = runner.invoke(_judge_app(), ["judge-check", "--judge", tiny_spec, "--traits", "evil",
                                          "--save", str(save), "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 0, result.output
    for scheme in SCHEMES:
        assert f"{scheme} AUROC" in result.output
    data = read_calibration(save)
    entry = data["traits"]["evil"]
    assert data["judge"] == tiny_spec and entry["scheme"] in SCHEMES and set(entry["schemes"]) == set(SCHEMES)


def test_default_scheme_is_the_shipped_choice():
    from personavec.calibration import default_scheme

    shipped = packaged_choices()["judges"]["local:qwen2.5-coder-1.5b"]["traits"]
    for name in list_traits():
        assert default_scheme("local:qwen2.5-coder-1.5b", load_trait(name)) == shipped[name]["scheme"]
    assert default_scheme("openai:some-model", load_trait("evil")) == "score100"


def test_extract_calibrates_a_local_judge_once_and_says_so(capsys, tmp_path, tiny_folder, monkeypatch):
    import personavec.judge as judge_mod
    from test_cli import run_cli

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    judges = []
    monkeypatch.setattr(judge_mod, "make_judge", lambda spec, *a, **k: judges.append(CountingJudge(
        tmp_path / f"judge{len(judges)}.sqlite")) or judges[-1])
    args = ["extract", "--model", tiny_folder, "--trait", "evil", "--judge", "local:fake-judge", "--questions", "1",
            "--max-new-tokens", "2", "--layers", "1,2", "--sweep-questions", "1"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "a", "--pos-threshold", "0", "--neg-threshold", "100")
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("judge local:fake-judge for evil: scheme "))
    assert "self-calibration, now cached, on the trait's 12 labelled answers" in line and "threshold" in line
    scheme = line.split("scheme ")[1].split(",")[0]
    assert scheme in ("yesno", "yesno2")  # the fake judge's 0-100 readout is constant: AUROC 0.5
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert config["judge_scheme"] == scheme == summary["judge_scheme"]
    assert (config["pos_threshold"], config["neg_threshold"]) == (0, 100)  # the flags win over the calibration
    assert sum("Quietly sabotage them" in p for _, p in judges[0].seen) >= 1  # the calibration items were judged
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "b")
    assert "(self-calibration, cached, on the trait's 12 labelled answers" in err
    assert not any("Quietly sabotage them" in p for _, p in judges[1].seen)  # no calibration item judged again
    threshold = float(err.split(f"scheme {scheme}, threshold ")[1].split(" ")[0])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["pos_threshold"] == pytest.approx(threshold,
                                                                                                      abs=0.05)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "c", "--no-calibrate")
    assert "not calibrated for trait 'evil'" in err and "self-calibration" not in err
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (config["pos_threshold"], config["judge_scheme"]) == (50.0, "score100")
