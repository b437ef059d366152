"""extract / evaluate on a tiny random model: resume, pair filtering, layer choice, bad input."""

import json
from pathlib import Path

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.judge import Judge
from personavec.models import load_model
import personavec.generate as generate_mod
from personavec.pipeline.evaluate import EvaluateConfig, mc_accuracy, capability_items, run_evaluate
from personavec.pipeline.extract import ExtractConfig, choose_layer, keep_pairs, run_extract
from personavec.traits import load_trait
from personavec.vectors import PersonaVector


class ConstantJudge(Judge):
    """A real Judge subclass (cache, counters and all) whose 'model' scores every prompt 80."""

    spec, identity = "test:constant", "v1"

    def _compute(self, prompts, done):
        for prompt in prompts:
            done(prompt, {"expected": 80.0, "mass": 1.0, "refused": False})


@pytest.fixture
def tiny_lm(tiny_folder):
    return load_model(tiny_folder, dtype="fp32")


def cfg_for(folder, **kw):
    base = dict(model=folder, trait="optimistic", judge="none", questions=2, max_new_tokens=4, batch_size=4,
                candidate_layers=[1, 2], sweep_questions=2)
    return ExtractConfig(**{**base, **kw})


def test_extract_without_judge_keeps_everything_and_resumes(tiny_folder, tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    trait = load_trait("optimistic")
    full = run_extract(cfg_for(tiny_folder), trait, model, tok, None, tmp_path / "a")
    assert full.summary["counts"]["pairs_kept"] == 10  # 5 instructions x 2 questions
    assert "separation" in full.summary["layer_method"] and full.summary["layer"] in (1, 2)
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"config.json", "responses.jsonl", "summary.json",
                                                            "report.html", "vectors.safetensors", "judged.jsonl"}

    # kill after the second batch of answers, then rerun: nothing regenerated, same vectors
    real_generate = generate_mod.generate
    calls = {"n": 0}

    def dying_generate(*args, on_batch=None, **kwargs):
        def counting(indices, answers):
            calls["n"] += 1
            on_batch(indices, answers)
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real_generate(*args, on_batch=counting, **kwargs)

    monkeypatch.setattr(generate_mod, "generate", dying_generate)
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg_for(tiny_folder), trait, model, tok, None, tmp_path / "b")
    written = [json.loads(line) for line in (tmp_path / "b" / "responses.jsonl").read_text().splitlines()]
    assert len(written) == 8 and not (tmp_path / "b" / "vectors.safetensors").exists()

    asked = []
    monkeypatch.setattr(generate_mod, "generate", lambda m, t, chats, **kw: asked.append(len(chats)) or real_generate(m, t, chats, **kw))
    resumed = run_extract(cfg_for(tiny_folder), trait, model, tok, None, tmp_path / "b")
    assert asked == [20 - 8]
    torch.testing.assert_close(resumed.vector.vectors, full.vector.vectors)


def test_extract_with_judge_filters_pairs_and_sweeps_layers(tiny_folder, tiny_lm, tmp_path):
    model, tok = tiny_lm
    judge = ConstantJudge(cache=tmp_path / "cache.sqlite")
    # every answer scores 80: pos answers pass >= 50, neg answers pass < 90
    cfg = cfg_for(tiny_folder, judge="test", neg_threshold=90)
    result = run_extract(cfg, load_trait("optimistic"), model, tok, judge, tmp_path / "r")
    assert result.summary["counts"]["pairs_kept"] == 10
    assert [row["layer"] for row in result.summary["layer_sweep"]] == [0, 1, 2]
    assert result.summary["layer"] in (1, 2)
    loaded = PersonaVector.load(tmp_path / "r" / "vectors.safetensors")
    assert (loaded.layer, loaded.coef, loaded.coef_mode) == (result.summary["layer"], 0.5, "norm")
    calls = judge.stats["calls"]
    run_extract(cfg, load_trait("optimistic"), model, tok, judge, tmp_path / "r")
    assert judge.stats["calls"] == calls  # a rerun pays for no judge call


def test_every_pair_filtered_names_the_threshold(tiny_folder, tiny_lm, tmp_path):
    model, tok = tiny_lm
    judge = ConstantJudge(cache=tmp_path / "cache.sqlite")
    with pytest.raises(PersonavecError, match="10 pos answers scored < --pos-threshold 90"):
        run_extract(cfg_for(tiny_folder, judge="test", pos_threshold=90, neg_threshold=90), load_trait("optimistic"), model, tok, judge,
                    tmp_path / "r")


def test_pairs_are_matched_by_id_not_row_order():
    rows = [
        {"pair": "p1", "polarity": "pos", "trait_score": 90, "coherence": 90},
        {"pair": "p2", "polarity": "neg", "trait_score": 10, "coherence": 90},
        {"pair": "p2", "polarity": "pos", "trait_score": 10, "coherence": 90},  # p2's pos fails
        {"pair": "p1", "polarity": "neg", "trait_score": 10, "coherence": 90},
    ]
    pos, neg, counts = keep_pairs(rows, ExtractConfig(model="m", trait="t", judge="j"), judged=True)
    assert [r["pair"] for r in pos] == ["p1"] and [r["pair"] for r in neg] == ["p1"]
    assert counts["pos_failing_trait"] == 1


def test_choose_layer_prefers_trait_among_coherent():
    table = [{"layer": 0, "steered": False, "trait": 40, "coherence": 90},
             {"layer": 3, "steered": True, "trait": 90, "coherence": 20},
             {"layer": 5, "steered": True, "trait": 70, "coherence": 80},
             {"layer": 7, "steered": True, "trait": 60, "coherence": 85}]
    assert choose_layer(table, 50)[0] == 5
    assert choose_layer(table, 95)[0] == 7  # none coherent enough: the most coherent


def test_run_folder_with_other_config_is_refused(tiny_folder, tiny_lm, tmp_path):
    model, tok = tiny_lm
    run_extract(cfg_for(tiny_folder), load_trait("optimistic"), model, tok, None, tmp_path / "a")
    with pytest.raises(PersonavecError, match="holds a different run"):
        run_extract(cfg_for(tiny_folder, questions=1), load_trait("optimistic"), model, tok, None, tmp_path / "a")


def test_evaluate_curve_and_capability(tiny_folder, tiny_lm, tmp_path):
    model, tok = tiny_lm
    result = run_extract(cfg_for(tiny_folder), load_trait("optimistic"), model, tok, None, tmp_path / "x")
    judge = ConstantJudge(cache=tmp_path / "cache.sqlite")
    cfg = EvaluateConfig(model=tiny_folder, trait="optimistic", vector="v", judge="test", coefs=[-1.0, 0.0, 1.0],
                         questions=2, max_new_tokens=3, batch_size=4, capability=True, capability_items=8)
    summary = run_evaluate(cfg, load_trait("optimistic"), result.vector, model, tok, judge, tmp_path / "e")
    assert [e["coef"] for e in summary["per_coef"]] == [-1.0, 0.0, 1.0]
    assert all(e["trait"]["n"] == 2 and 0 <= e["capability_accuracy"] <= 1 for e in summary["per_coef"])
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["per_coef"][0]["coef"] == -1.0


def test_mc_accuracy_matches_full_forward(tiny_lm):
    model, tok = tiny_lm
    items = capability_items(6)
    # independent: one full forward per item, argmax over the letters at the last position
    from personavec.chat import prompt_text
    from personavec.pipeline.evaluate import LETTERS, mc_prompt

    ids = [tok(letter, add_special_tokens=False)["input_ids"][0] for letter in LETTERS]
    expected = 0
    for item in items:
        x = torch.tensor([tok(prompt_text(tok, mc_prompt(item)), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(x).logits[0, -1, ids]
        expected += LETTERS[int(logits.argmax())] == item["answer"]
    assert mc_accuracy(model, tok, items, batch_size=4) == pytest.approx(expected / len(items))


def test_evaluate_with_a_new_vector_at_the_same_path_is_a_new_run(tiny_folder, tiny_lm, tmp_path):
    model, tok = tiny_lm
    result = run_extract(cfg_for(tiny_folder), load_trait("optimistic"), model, tok, None, tmp_path / "x")
    cfg = EvaluateConfig(model=tiny_folder, trait="optimistic", vector="v", judge="none", coefs=[1.0],
                         questions=1, max_new_tokens=2, batch_size=4)
    run_evaluate(cfg, load_trait("optimistic"), result.vector, model, tok, None, tmp_path / "e")
    other = PersonaVector(vectors=result.vector.vectors * 2, layer=result.vector.layer, norms=result.vector.norms)
    with pytest.raises(PersonavecError, match="vector_sha256"):
        run_evaluate(cfg, load_trait("optimistic"), other, model, tok, None, tmp_path / "e")


def test_evaluate_reports_a_prompting_baseline(tiny_folder, tiny_lm, tmp_path):
    """Unsteered answers under the trait's pos / neg instruction (pair q mod 5), and the coef-0 answers as 'none'."""
    from personavec.generate import generate

    model, tok = tiny_lm
    trait = load_trait("optimistic")
    result = run_extract(cfg_for(tiny_folder), trait, model, tok, None, tmp_path / "x")
    judge = ConstantJudge(cache=tmp_path / "cache.sqlite")
    cfg = EvaluateConfig(model=tiny_folder, trait="optimistic", vector="v", judge="test", coefs=[-1.0, 0.0, 1.0],
                         questions=2, max_new_tokens=3, batch_size=4)
    summary = run_evaluate(cfg, trait, result.vector, model, tok, judge, tmp_path / "e")
    assert set(summary["baseline"]) == {"pos_instruction", "neg_instruction", "no_instruction"}
    assert all(b["n"] == 2 for b in summary["baseline"].values())
    rows = [json.loads(line) for line in (tmp_path / "e" / "judged.jsonl").read_text().splitlines()]
    pos = sorted((r for r in rows if r.get("condition") == "pos_instruction"), key=lambda r: r["id"])
    assert [r["system"] for r in pos] == [trait.system_prompt(0, "pos"), trait.system_prompt(1, "pos")]
    chats = [[{"role": "system", "content": r["system"]}, {"role": "user", "content": r["question"]}] for r in pos]
    assert [r["answer"] for r in pos] == generate(model, tok, chats, max_new_tokens=3, show_progress=False)
    assert not any(r.get("condition") == "no_instruction" for r in rows)  # coef 0 is the no-instruction answer
    assert "Prompting baseline" in (tmp_path / "e" / "report.html").read_text()


def test_registers_recipe_gives_both_sides_of_a_pair_the_same_register(tiny_folder, tiny_lm, tmp_path):
    from personavec.languages import get_language
    from personavec.pipeline.extract import extraction_items

    trait = load_trait("optimistic")
    registers = get_language("en").registers
    paper = extraction_items(trait, 3, 2)
    varied = extraction_items(trait, 3, 2, "registers")
    assert [it["id"] for it in paper] == [it["id"] for it in varied]
    by_pair: dict[str, set] = {}
    for plain, item in zip(paper, varied):
        assert "register" not in plain
        assert item["system"] == f"{plain['system']} {item['register']}"
        expected = registers[(item["instruction"] + item["question_index"] + item["sample"]) % len(registers)]
        assert item["register"] == expected
        by_pair.setdefault(item["pair"], set()).add(item["register"])
    assert all(len(found) == 1 for found in by_pair.values())
    assert {it["register"] for it in varied} == set(registers)  # 30 pairs cycle through all of them

    # the recipe is part of the run: a paper run's folder is not resumed as a registers run
    model, tok = tiny_lm
    run_extract(cfg_for(tiny_folder), trait, model, tok, None, tmp_path / "run")
    assert "recipe" not in json.loads((tmp_path / "run" / "config.json").read_text())  # old runs stay resumable
    with pytest.raises(PersonavecError, match="config differs in: recipe"):
        run_extract(cfg_for(tiny_folder, recipe="registers"), trait, model, tok, None, tmp_path / "run")
    result = run_extract(cfg_for(tiny_folder, recipe="registers"), trait, model, tok, None, tmp_path / "reg")
    rows = [json.loads(line) for line in (tmp_path / "reg" / "responses.jsonl").read_text().splitlines()]
    assert result.summary["recipe"] == "registers" and all(r["register"] in registers for r in rows)


def test_unknown_recipe_and_a_language_without_registers_are_refused():
    from personavec.pipeline.extract import extraction_items

    with pytest.raises(PersonavecError, match="recipe=style: unknown recipe"):
        extraction_items(load_trait("optimistic"), 2, 1, "style")
    japanese = load_trait(str(Path(__file__).resolve().parent.parent / "personavec/data/multilingual/optimistic.ja.json"))
    with pytest.raises(PersonavecError, match="no register phrases for language 'ja'"):
        extraction_items(japanese, 2, 1, "registers")
    assert extraction_items(japanese, 2, 1)  # the paper recipe works in every language
