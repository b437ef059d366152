"""Breakdowns by a field: the grouping against hand counts, AUROC and correlation against independent
computations, and the errors for missing fields and unusable values."""

from __future__ import annotations

import math
import random

import pytest

from personavec.breakdown import (BOOTSTRAP_LIMIT, breakdown_rows, field_value, group_by, group_keys,
                                  report_section)
from personavec.chat import ChatRecord
from personavec.errors import PersonavecError, cli_style

MSG = [{"role": "user", "content": "hi"}]


def record(fields: dict, line: int) -> ChatRecord:
    return ChatRecord(messages=MSG, fields=fields, where=f"data.jsonl:{line}")


def pairwise_auroc(labels, scores):
    """P(positive > negative), ties 1/2, by counting every pair."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def hand_pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_field_value_reads_dotted_paths_of_dicts_and_chat_records():
    line = {"meta": {"source": "web", "n": {"deep": 0}}, "language": "en"}
    assert field_value(line, "language") == "en"
    assert field_value(line, "meta.n.deep") == 0
    assert field_value(record(line, 1), "meta.source") == "web"
    with pytest.raises(KeyError):
        field_value(line, "meta.missing")
    with pytest.raises(KeyError):
        field_value(line, "language.x")  # a string has no fields
    with pytest.raises(KeyError):
        field_value(record(line, 1), "messages.0")  # lists are not indexed


def test_group_counts_means_and_sds_match_a_hand_count():
    values = [1.0, 2.0, 3.0, 4.0, None, 6.0, float("nan")]
    keys = ["a", "b", "a", "b", "a", "c", "c"]
    bd = group_by(values, keys, field="language", measure="projection", bootstrap=200)
    assert bd["field"] == "language" and bd["measure"] == "projection"
    a, b, c = bd["groups"]
    assert [g["value"] for g in bd["groups"]] == ["a", "b", "c"]
    assert (a["count"], a["scored"], a["mean"]) == (3, 2, 2.0) and a["sd"] == pytest.approx(math.sqrt(2))
    assert (b["count"], b["scored"], b["mean"]) == (2, 2, 3.0) and b["sd"] == pytest.approx(math.sqrt(2))
    assert (c["count"], c["scored"], c["mean"], c["sd"], c["ci"]) == (7 - 5, 1, 6.0, None, None)
    assert bd["all"]["count"] == 7 and bd["all"]["scored"] == 5 and bd["all"]["mean"] == pytest.approx(16 / 5)
    assert a["ci"][0] >= 1.0 and a["ci"][1] <= 3.0 and a["ci"][0] < a["ci"][1]  # resampled means of {1, 3}
    assert "auroc" not in a and "pearson" not in a


def test_group_values_keep_json_kinds_apart_and_sort_stably():
    keys = ["x", 1, True, None, 1.0, 2, "1", False, None]
    bd = group_by([float(i) for i in range(len(keys))], keys, bootstrap=100)
    assert [(g["value"], g["count"]) for g in bd["groups"]] == [(1, 2), (2, 1), ("1", 1), ("x", 1), (False, 1),
                                                                 (True, 1), (None, 2)]
    assert isinstance(bd["groups"][4]["value"], bool)
    # the order does not depend on the order of the lines
    again = group_by(list(reversed([float(i) for i in range(len(keys))])), list(reversed(keys)), bootstrap=100)
    assert [g["value"] for g in again["groups"]] == [g["value"] for g in bd["groups"]]
    assert [g["mean"] for g in again["groups"]] == [g["mean"] for g in bd["groups"]]


def test_auroc_per_group_equals_a_pairwise_count():
    rng = random.Random(3)
    keys = [rng.choice(["web", "books", "chat"]) for _ in range(60)]
    labels = [rng.randint(0, 1) for _ in keys]
    values = [round(rng.gauss(y, 1.0), 1) for y in labels]  # rounded: ties happen and count 1/2
    bd = group_by(values, keys, labels, field="meta.source", labels_field="y", bootstrap=100)
    assert bd["labels"] == "y"
    for g in bd["groups"]:
        mine = [i for i, k in enumerate(keys) if k == g["value"]]
        ys, vs = [labels[i] for i in mine], [values[i] for i in mine]
        assert g["auroc"] == pytest.approx(pairwise_auroc(ys, vs))
        assert (g["positives"], g["negatives"]) == (sum(ys), len(ys) - sum(ys))
    assert bd["all"]["auroc"] == pytest.approx(pairwise_auroc(labels, values))
    one_class = group_by([1.0, 2.0, 3.0], ["a", "a", "b"], [1, 1, 0], bootstrap=10)
    assert one_class["groups"][0]["auroc"] is None and one_class["groups"][1]["auroc"] is None


def test_correlation_per_group_equals_a_hand_pearson():
    rng = random.Random(1)
    keys = [rng.choice([0, 1]) for _ in range(40)]
    scores = [rng.uniform(0, 100) for _ in keys]
    values = [s / 50 + rng.gauss(0, 0.5) for s in scores]
    scores[5] = None  # a line without a score is left out of the pairs, not of the mean
    bd = group_by(values, keys, scores=scores, scores_field="judge.trait_score", bootstrap=100)
    for g in bd["groups"]:
        mine = [i for i, k in enumerate(keys) if k == g["value"] and scores[i] is not None]
        assert g["pairs"] == len(mine) and g["scored"] == sum(k == g["value"] for k in keys)
        assert g["pearson"] == pytest.approx(hand_pearson([values[i] for i in mine], [scores[i] for i in mine]))
        assert -1 <= g["spearman"] <= 1


def test_interval_of_a_large_group_is_the_normal_approximation():
    n = BOOTSTRAP_LIMIT + 1
    values = [float(i % 7) for i in range(n)]
    g = group_by(values, ["all"] * n)["groups"][0]
    half = 1.959964 * g["sd"] / math.sqrt(n)
    assert g["ci"] == pytest.approx([g["mean"] - half, g["mean"] + half])
    small = group_by(values[:50], ["all"] * 50, bootstrap=300)["groups"][0]
    assert small["ci"][0] < small["mean"] < small["ci"][1]


def test_group_keys_names_the_field_file_and_first_line_without_it():
    records = [record({"meta": {"source": "a"}}, 1), record({"meta": {"source": "b"}}, 2), record({"meta": {}}, 3),
               record({}, 4)]
    with pytest.raises(PersonavecError) as info:
        group_keys(records, "meta.source")
    assert str(info.value) == "by=meta.source: data.jsonl:3 has no field 'meta.source'"
    with cli_style(), pytest.raises(PersonavecError) as info:
        group_keys(records, "meta.source")
    assert str(info.value) == "--by meta.source: data.jsonl:3 has no field 'meta.source'"
    assert group_keys(records[:2], "meta.source") == ["a", "b"]
    with pytest.raises(PersonavecError, match=r"^by=x: line 2 has no field 'x'$"):
        group_keys([{"x": 1}, {"y": 1}], "x")


@pytest.mark.parametrize("value, says", [({"a": 1}, "holds an object"), ([1, 2], "holds a list"),
                                          (float("nan"), "is nan; group by a finite value")])
def test_group_keys_refuses_objects_lists_and_nan(value, says):
    with cli_style(), pytest.raises(PersonavecError) as info:
        group_keys([record({"m": "ok"}, 1), record({"m": value}, 2)], "m")
    assert str(info.value).startswith("--by m: data.jsonl:2: field 'm' ") and says in str(info.value)


def test_group_keys_keeps_an_explicit_null_as_its_own_group():
    keys = group_keys([record({"s": None}, 1), record({"s": "web"}, 2)], "s")
    assert keys == [None, "web"]
    bd = group_by([1.0, 2.0], keys, bootstrap=10)
    assert [g["value"] for g in bd["groups"]] == ["web", None]


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(PersonavecError, match=r"by='meta\.': give a field name"):
        group_keys([record({}, 1)], "meta.")
    with pytest.raises(PersonavecError, match="keys= has 1 entries for 2 values"):
        group_by([1.0, 2.0], ["a"])
    with pytest.raises(PersonavecError, match="labels=: 2 is not 0 or 1"):
        group_by([1.0, 2.0], ["a", "a"], labels=[0, 2])


def test_rows_and_report_section_show_every_group_and_the_total():
    long_name = "a source name that is much longer than any column a terminal would give it " * 2
    bd = group_by([1.0, 2.0, 3.0, 4.0], [long_name, long_name, "b", "b"], [0, 1, 0, 1], field="meta.source",
                  measure="projection", labels_field="y", bootstrap=50)
    headers, rows = breakdown_rows(bd)
    assert headers[:6] == ["meta.source", "count", "scored", "mean", "sd", "95% CI"] and "AUROC vs y" in headers
    assert [r[0] for r in rows] == [long_name, "b", "(all)"] and rows[0][3] == "1.500"
    heading, body = report_section(bd, [1.0, 2.0, 3.0, 4.0], [long_name, long_name, "b", "b"])
    assert heading == "projection by meta.source"
    assert "data:image/png;base64" in body and long_name.strip() in body and "(all)" in body


# -- the commands, on a tiny random model -----------------------------------------------------------------------

LONG = "a source whose name is far longer than a terminal column would ever be, and must stay whole " * 2
SOURCES = ["web", LONG, "web", LONG, "web", LONG]


@pytest.fixture
def by_setup(tiny_folder, tmp_path, monkeypatch):
    """The tiny model, a vector for it, and six chats with a dotted field `meta.source`, a 0/1 label `y` and a
    number `n`."""
    import json

    from conftest import CHATS
    from test_uses import random_vector

    from personavec.models import load_model

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(tiny_folder, dtype="fp32")
    vector_path = tmp_path / "v.safetensors"
    random_vector(model, layer=2).save(vector_path)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": CHATS[i % 3], "meta": {"source": s}, "y": [0, 1, 1, 0, 1, 0][i],
                                        "n": float(i * i)}) + "\n" for i, s in enumerate(SOURCES)))
    return tiny_folder, vector_path, data


def _lines(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def _hand_groups(rows, score):
    """{source: [scores]} counted by hand from the output file."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["meta"]["source"], []).append(score(r))
    return groups


def test_monitor_by_groups_the_output_projections(by_setup, tmp_path, capsys):
    import json

    from test_cli import run_cli

    folder, vector_path, data = by_setup
    code, _, err = run_cli(capsys, "monitor", "--model", folder, "--vector", vector_path, "--input", data,
                           "--output", tmp_path / "mon.jsonl", "--by", "meta.source", "--scores", "n")
    assert code == 0, err
    rows = _lines(tmp_path / "mon.jsonl")
    hand = _hand_groups(rows, lambda r: r["persona"]["projection"])
    by = json.loads((tmp_path / "mon_run" / "summary.json").read_text())["by"]
    assert by["field"] == "meta.source" and by["measure"] == "projection" and by["scores"] == "n"
    assert [g["value"] for g in by["groups"]] == sorted(hand)
    for g in by["groups"]:
        mine = hand[g["value"]]
        assert g["count"] == len(mine) == 3 and g["mean"] == pytest.approx(sum(mine) / 3)
        ns = [r["n"] for r in rows if r["meta"]["source"] == g["value"]]
        assert g["pearson"] == pytest.approx(hand_pearson(mine, ns))
        assert g["ci"][0] <= g["mean"] <= g["ci"][1]
    assert LONG.strip() in err  # the table on stderr keeps the long name whole
    report = (tmp_path / "mon_run" / "report.html").read_text()
    assert "projection by meta.source" in report and report.count("data:image/png;base64") == 3


def test_screen_by_gives_auroc_per_group(by_setup, tmp_path, capsys):
    import json

    from test_cli import run_cli

    folder, vector_path, data = by_setup
    code, _, err = run_cli(capsys, "screen", "--model", folder, "--vector", vector_path, "--data", data,
                           "--output", tmp_path / "s.jsonl", "--approx", "--labels", "y", "--by", "meta.source")
    assert code == 0, err
    rows = _lines(tmp_path / "s.jsonl")
    by = json.loads((tmp_path / "s_run" / "summary.json").read_text())["by"]
    assert by["measure"] == "approx_projection_difference" and by["labels"] == "y"
    for g in by["groups"]:
        mine = [r for r in rows if r["meta"]["source"] == g["value"]]
        scores = [r["persona"]["approx_projection_difference"] for r in mine]
        assert g["count"] == 3 and g["mean"] == pytest.approx(sum(scores) / 3)
        assert g["auroc"] == pytest.approx(pairwise_auroc([r["y"] for r in mine], scores))
    assert "AUROC vs y" in err and LONG.strip() in err
    assert "approx_projection_difference by meta.source" in (tmp_path / "s_run" / "report.html").read_text()


@pytest.mark.parametrize("command", ["monitor", "screen"])
def test_a_line_without_the_field_is_refused_before_the_model_loads(by_setup, tmp_path, capsys, monkeypatch, command):
    import json

    import personavec.backends as backends
    from test_cli import run_cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --by was checked")

    monkeypatch.setattr(backends, "load_backend", no_model)
    folder, vector_path, data = by_setup
    lines = data.read_text().splitlines()
    broken = json.loads(lines[2])
    del broken["meta"]["source"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + [json.dumps(broken)] + lines[3:]) + "\n")
    io = ["--input", bad] if command == "monitor" else ["--data", bad, "--approx"]
    code, _, err = run_cli(capsys, command, "--model", folder, "--vector", vector_path, *io,
                           "--output", tmp_path / "o.jsonl", "--by", "meta.source")
    assert code == 2 and err.strip().splitlines()[-1] == f"error: --by meta.source: {bad}:3 has no field 'meta.source'"
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o_run").exists()
    code, _, err = run_cli(capsys, command, "--model", folder, "--vector", vector_path, *io,
                           "--output", tmp_path / "o.jsonl", "--by", "meta")
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: --by meta: {bad}:1: field 'meta' holds an object")
    code, _, err = run_cli(capsys, command, "--model", folder, "--vector", vector_path, *io,
                           "--output", tmp_path / "o.jsonl", "--by", "meta.")
    assert code == 2 and "--by 'meta.': give a field name or a dotted path" in err


def test_judge_by_writes_a_run_folder_with_the_breakdown(by_setup, tmp_path, capsys, monkeypatch):
    import json

    from test_cli import run_cli
    from tiny import save_tiny

    import personavec.judge as judge_mod

    def scores_by_length(scorer, trait, items, progress=None, scheme="score100", **kw):
        """The tiny judge rarely gives a score: a known one per answer instead (None for the one-letter "ok")."""
        if progress:
            progress(len(items))
        return [{"trait_score": None if len(a) < 3 else float(len(a)), "coherence": 50.0} for _, a in items]

    monkeypatch.setattr(judge_mod, "judge_answers", scores_by_length)
    _, _, data = by_setup
    judge = "local:" + save_tiny(tmp_path / "judge", multi_digit=True)
    base = ["judge", "--judge", judge, "--trait", "impolite", "--input", data, "--cache", tmp_path / "c.sqlite",
            "--output", tmp_path / "j.jsonl"]
    code, _, err = run_cli(capsys, *base, "--by", "meta.source", "--scores", "n")
    assert code == 0, err
    rows = _lines(tmp_path / "j.jsonl")
    summary = json.loads((tmp_path / "j_run" / "summary.json").read_text())
    by = summary["by"]
    assert by["field"] == "meta.source" and by["measure"] == "trait_score" and by["scores"] == "n"
    hand = _hand_groups(rows, lambda r: r["judge"]["trait_score"])
    assert sorted(hand) == [g["value"] for g in by["groups"]]
    for g in by["groups"]:
        scored = [v for v in hand[g["value"]] if v is not None]
        assert (g["count"], g["scored"]) == (3, len(scored)) and len(scored) >= 2
        assert g["mean"] == pytest.approx(sum(scored) / len(scored))
        pairs = [(r["judge"]["trait_score"], r["n"]) for r in rows
                 if r["meta"]["source"] == g["value"] and r["judge"]["trait_score"] is not None]
        assert g["pearson"] == pytest.approx(hand_pearson(*zip(*pairs)))
    assert summary["unscored"] == 2  # the two "ok" answers: counted, not averaged
    assert summary["n"] == 6 and "correlation" in summary and LONG.strip() in err
    assert "trait_score by meta.source" in (tmp_path / "j_run" / "report.html").read_text()
    # no --by, --scores or --out: no run folder, as before
    code, _, err = run_cli(capsys, *base[:-1], tmp_path / "plain.jsonl")
    assert code == 0, err
    assert (tmp_path / "plain.jsonl").exists() and not (tmp_path / "plain_run").exists()
    # a line without the field: one line, before the judge loads
    monkeypatch.setattr(judge_mod, "make_judge", lambda *a, **k: pytest.fail("the judge loaded before --by was checked"))
    lines = data.read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:4] + ['{"messages": ' + json.dumps(json.loads(lines[4])["messages"])
                                                               + "}"]) + "\n")
    code, _, err = run_cli(capsys, *base[:6], tmp_path / "bad.jsonl", "--output", tmp_path / "b.jsonl", "--by",
                           "meta.source")
    assert code == 2 and err.strip().splitlines()[-1] == \
        f"error: --by meta.source: {tmp_path / 'bad.jsonl'}:5 has no field 'meta.source'"
    assert not (tmp_path / "b.jsonl").exists() and not (tmp_path / "b_run").exists()


def test_evaluate_by_question_and_by_coef_match_the_judged_rows(tiny_folder, tmp_path):
    import json

    from test_uses import random_vector

    from personavec.judge import Judge
    from personavec.models import load_model
    from personavec.pipeline.evaluate import EvaluateConfig, run_evaluate
    from personavec.traits import load_trait

    class CharacterSumJudge(Judge):
        """Scores a prompt by the sum of its characters, so different answers get different scores."""

        spec, identity = "test:character-sum", "v1"

        def _compute(self, prompts, done):
            for prompt in prompts:
                done(prompt, {"expected": float(sum(map(ord, prompt)) % 101), "mass": 1.0, "refused": False})

    model, tok = load_model(tiny_folder, dtype="fp32")
    vector = random_vector(model, layer=2)
    cfg = EvaluateConfig(model=tiny_folder, trait="optimistic", vector="v", judge="test", coefs=[-8.0, 0.0, 8.0], coef_mode="raw",
                         questions=3, max_new_tokens=6, batch_size=8, baseline=False)
    judge = CharacterSumJudge(cache=tmp_path / "cache.sqlite")
    summary = run_evaluate(cfg, load_trait("optimistic"), vector, model, tok, judge, tmp_path / "e", by="question")
    rows = [json.loads(line) for line in (tmp_path / "e" / "judged.jsonl").read_text().splitlines()]
    by = summary["by"]
    assert by["field"] == "question" and by["measure"] == "trait_score" and by["scores"] == "coef"
    assert sorted(r["question"] for r in rows if r["coef"] == 0.0) == [g["value"] for g in by["groups"]]
    for g in by["groups"]:
        mine = sorted((r["coef"], r["trait_score"]) for r in rows if r["question"] == g["value"])
        assert g["count"] == 3 and g["mean"] == pytest.approx(sum(t for _, t in mine) / 3)
        ts = [t for _, t in mine]
        assert g["pearson"] == (None if len(set(ts)) == 1 else pytest.approx(hand_pearson([c for c, _ in mine], ts)))
    assert any(g["pearson"] is not None for g in by["groups"])  # steering changed some answers
    assert "trait_score by question" in (tmp_path / "e" / "report.html").read_text()
    again = run_evaluate(cfg, load_trait("optimistic"), vector, model, tok, judge, tmp_path / "e", by="coef")
    assert [(g["value"], g["count"]) for g in again["by"]["groups"]] == [(-8.0, 3), (0.0, 3), (8.0, 3)]
    for g, curve in zip(again["by"]["groups"], again["per_coef"]):
        assert g["mean"] == pytest.approx(curve["trait"]["mean"])  # the curve's mean, now with an interval
        assert "pearson" not in g  # a constant coef has no correlation to report


def test_evaluate_and_profile_refuse_other_fields_before_the_model_loads(tmp_path, capsys):
    from test_cli import run_cli

    code, _, err = run_cli(capsys, "evaluate", "--model", "no-such-model", "--trait", "optimistic", "--vector",
                           tmp_path / "v.safetensors", "--coefs", "0,1", "--judge", "local:no-such-judge", "--out",
                           tmp_path / "e", "--by", "meta.source")
    assert code == 2 and err.strip().splitlines()[-1] == ("error: --by meta.source: evaluate groups its steered "
                                                          "answers by coef or question (a trait's questions carry "
                                                          "no other fields)")
    (tmp_path / "vectors").mkdir()
    code, _, err = run_cli(capsys, "profile", "--model", "no-such-model", "--vectors", tmp_path / "vectors",
                           "--out", tmp_path / "p", "--by", "language")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --by language: profile groups")
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()


def test_profile_by_model_and_by_question_match_the_readings(tiny_folder, tmp_path, capsys):
    import json

    from test_cli import run_cli
    from test_profile import tiny_vector

    from personavec.pipeline.profile import ProfileConfig, profile_breakdown

    vectors = tmp_path / "vectors"
    vectors.mkdir()
    tiny_vector("optimistic", 2, 0).save(vectors / "optimistic.safetensors")
    tiny_vector("humorous", 3, 1).save(vectors / "humorous.safetensors")
    code, _, err = run_cli(capsys, "profile", "--model", tiny_folder, "--vectors", vectors, "--questions", "3",
                           "--max-new-tokens", "4", "--bootstrap", "200", "--compare", tiny_folder, "--out",
                           tmp_path / "p", "--by", "model")
    assert code == 0, err
    readings = json.loads((tmp_path / "p" / "readings.json").read_text())
    by = json.loads((tmp_path / "p" / "summary.json").read_text())["by"]
    assert by["field"] == "model"
    assert [(g["trait"], g["value"], g["count"]) for g in by["groups"]] == [
        (t, m, 3) for t in ("humorous", "optimistic") for m in (tiny_folder, f"{tiny_folder} (compare)")]
    for g in by["groups"]:
        mine = readings[g["trait"]]["response_scaled"]
        assert g["measure"] == "response_scaled" and g["mean"] == pytest.approx(sum(mine) / 3)
    assert "readings by model" in err and "response reading" in (tmp_path / "p" / "report.html").read_text()
    cfg = ProfileConfig(model="a", traits=list(readings), compare="b", bootstrap=100)
    per_question = profile_breakdown(readings, "question", cfg, readings)
    assert len(per_question["groups"]) == 6 and all(g["count"] == 2 and g["sd"] == 0.0 for g in per_question["groups"])
    assert {g["value"] for g in per_question["groups"] if g["trait"] == "humorous"} == \
        set(readings["humorous"]["questions"])
