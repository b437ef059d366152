"""monitor, screen and shift: the math by hand, the readings against output_hidden_states, the files and errors."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import CHATS, _tiny

from personavec.chat import ChatRecord, encode_chat, read_chats
from personavec.errors import PersonavecError
from personavec.pipeline.monitor import (StudyConfig, monitor_chats, monitor_summary, numeric_field, study_items,
                                         study_summary)
from personavec.pipeline.project import distribution, project_chats
from personavec.pipeline.screen import (BaseAnswerCache, ScreenConfig, base_answers, read_labels, run_screen,
                                        screen_records, select_rows)
from personavec.traits import load_trait
from personavec.vecmath import auroc, layerwise_projection, pearson, ranks, spearman
from personavec.vectors import PersonaVector


def random_vector(model, seed=0, layer=2, trait="optimistic"):
    from personavec.models import hidden_size, n_layers

    g = torch.Generator().manual_seed(seed)
    return PersonaVector(vectors=torch.randn(n_layers(model) + 1, hidden_size(model), generator=g), trait=trait,
                         layer=layer, norms=torch.ones(n_layers(model) + 1))


def hidden_state(model, tok, ids, layer, positions):
    """Independent reading: transformers' own hidden_states[layer] at the given token positions."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0, positions].float()


# -- the math, by hand -----------------------------------------------------------

def test_ranks_average_ties():
    assert ranks(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]


def test_pearson_and_spearman_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    xm, ym = np.array(x) - 2.5, np.array(y) - 5.0
    assert pearson(x, y) == pytest.approx(float(xm @ ym / np.sqrt((xm @ xm) * (ym @ ym))))
    assert spearman(x, y) == pytest.approx(1.0)  # monotone but not linear
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None


def test_rank_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 20, 200).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(labels.tolist(), scores.tolist()) == pytest.approx(pairwise)


def test_layerwise_projection_by_hand():
    diffs = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    vectors = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    assert layerwise_projection(diffs, vectors).tolist() == pytest.approx([4.0, -1.0])


def test_distribution_ignores_nan():
    d = distribution([1.0, math.nan, 3.0])
    assert d["n"] == 2 and d["mean"] == 2.0 and d["max"] == 3.0


# -- readings against output_hidden_states ----------------------------------------

@pytest.mark.parametrize("layer", [1, 3])
def test_project_chats_matches_hidden_states(tiny, layer):
    model, tok = tiny
    vector = random_vector(model, layer=layer)
    got = project_chats(model, tok, CHATS, vector, layer, ("prompt_last", "response_avg", "prompt_avg"),
                        show_progress=False)
    v_hat = vector.vectors[layer] / vector.vectors[layer].norm()
    for i, messages in enumerate(CHATS):
        e = encode_chat(tok, messages)
        h = hidden_state(model, tok, e.input_ids, layer, list(range(len(e.input_ids))))
        assert got["prompt_last"][i] == pytest.approx(float(h[e.prompt_len - 1] @ v_hat), abs=1e-4)
        assert got["response_avg"][i] == pytest.approx(float(h[e.prompt_len:].mean(0) @ v_hat), abs=1e-4)
        assert got["prompt_avg"][i] == pytest.approx(float(h[: e.prompt_len].mean(0) @ v_hat), abs=1e-4)


def test_monitor_reads_the_prompt_before_the_answer(tiny_llama):
    model, tok = tiny_llama
    vector = random_vector(model)
    with_answer = ChatRecord(CHATS[0], {"id": 1})
    without = ChatRecord(CHATS[0][:-1], {"id": 2})
    rows = monitor_chats(model, tok, [with_answer, without], vector, show_progress=False)
    # the answer is not read: the same prompt scores the same with or without it
    assert rows[0]["persona"]["projection"] == pytest.approx(rows[1]["persona"]["projection"], abs=1e-5)
    assert rows[0]["id"] == 1 and rows[0]["messages"] == CHATS[0]
    assert set(rows[0]["persona"]) == {"trait", "layer", "projection"} and rows[0]["persona"]["layer"] == 2


def test_monitor_threshold_skips_and_summary(tiny_llama):
    model, tok = tiny_llama
    vector = random_vector(model)
    records = [ChatRecord(c, {"score": i}) for i, c in enumerate(CHATS)]
    long_one = ChatRecord([{"role": "user", "content": "word " * 300}], {"score": 9})
    rows = monitor_chats(model, tok, records + [long_one], vector, threshold=0.0, max_length=100, show_progress=False)
    assert rows[3]["persona"]["projection"] is None and "skipped" in rows[3]["persona"]
    for row in rows[:3]:
        assert row["persona"]["flagged"] == (row["persona"]["projection"] > 0)
    summary = monitor_summary(rows, top_k=2, threshold=0.0, scores=[0.0, 1.0, 2.0, 9.0])
    assert summary["skipped"] == 1 and len(summary["top"]) == 2 and summary["correlation"]["n"] == 3
    assert summary["top"][0]["projection"] >= summary["top"][1]["projection"]
    with pytest.raises(PersonavecError, match="needs a final assistant message"):
        monitor_chats(model, tok, [long_one], vector, position="response_avg", show_progress=False)


def test_numeric_field_errors_name_the_line():
    record = ChatRecord(CHATS[0], {"judge": {"score": 3}, "bad": "x"}, where="f.jsonl:4")
    assert numeric_field(record, "judge.score") == 3.0
    with pytest.raises(PersonavecError, match=r"f.jsonl:4: no field 'judge.nope'"):
        numeric_field(record, "judge.nope")
    with pytest.raises(PersonavecError, match=r"f.jsonl:4: field 'bad' is 'x', not a number"):
        numeric_field(record, "bad")


def test_study_items_are_graded_and_summary_correlates():
    trait = load_trait("optimistic")
    cfg = StudyConfig(study="system-prompts", model="m", trait="optimistic", vector="v", judge="none", questions=2)
    items = study_items(cfg, trait)
    assert [it["level"] for it in items] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert items[-1]["messages"][0]["content"] == trait.system_prompt(1, "pos")
    assert items[0]["messages"][0]["content"] == trait.system_prompt(0, "neg")
    shots = [(f"q{i}", f"a{i}") for i in range(4)]
    many = study_items(StudyConfig(study="many-shot", model="m", trait="optimistic", vector="v", judge="none",
                                   questions=1, shots=[0, 2, 4]), trait, shots)
    assert [len(it["messages"]) for it in many] == [1, 5, 9]
    assert many[1]["messages"][:2] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]
    rows = [{"condition": c, "level": lvl, "projection": float(lvl + 0.1 * q), "trait_score": 10.0 * lvl + q}
            for lvl, c in enumerate("abc") for q in range(3)]
    s = study_summary(rows)
    assert s["projection_vs_level_spearman"] > 0.9 and s["pearson"] > 0.99
    assert [e["pearson_within"] for e in s["per_condition"]] == pytest.approx([1.0, 1.0, 1.0])


# -- screen -----------------------------------------------------------------------

def test_screen_scores_match_independent_computation(tiny_llama, tmp_path):
    model, tok = tiny_llama
    vector = random_vector(model, layer=2)
    records = [ChatRecord(c) for c in CHATS]
    cfg = ScreenConfig(model="tiny", vector="v", data="d", max_new_tokens=5, batch_size=2)
    cache = BaseAnswerCache(tmp_path / "answers.sqlite")
    personas, answers = screen_records(model, tok, records, vector, cfg, cache, show_progress=False)
    v_hat = vector.vectors[2] / vector.vectors[2].norm()
    for record, persona, answer in zip(records, personas, answers):
        e = encode_chat(tok, record.messages)
        h = hidden_state(model, tok, e.input_ids, 2, list(range(len(e.input_ids))))
        response = float(h[e.prompt_len:].mean(0) @ v_hat)
        assert persona["response_projection"] == pytest.approx(response, abs=1e-4)
        assert persona["approx_projection_difference"] == pytest.approx(response - float(h[e.prompt_len - 1] @ v_hat),
                                                                        abs=1e-4)
        if answer.strip():
            b = encode_chat(tok, record.prompt + [{"role": "assistant", "content": answer}])
            hb = hidden_state(model, tok, b.input_ids, 2, list(range(b.prompt_len, len(b.input_ids))))
            assert persona["projection_difference"] == pytest.approx(response - float(hb.mean(0) @ v_hat), abs=1e-4)
    # --approx leaves projection_difference out and generates nothing
    approx, none = screen_records(model, tok, records, vector, ScreenConfig("tiny", "v", "d", approx=True), cache,
                                  show_progress=False)
    assert none == [] and "projection_difference" not in approx[0]


def test_base_answers_are_cached_and_resume(tiny_llama, tmp_path, monkeypatch):
    import personavec.generate as generate_module

    model, tok = tiny_llama
    prompts = [c[:-1] for c in CHATS] + [CHATS[0][:-1]]  # a repeated prompt is generated once
    calls = []
    real = generate_module.generate

    def counting(model, tok, chats, **kw):
        calls.append(len(chats))
        return real(model, tok, chats, **kw)

    monkeypatch.setattr(generate_module, "generate", counting)
    cache = BaseAnswerCache(tmp_path / "a.sqlite")
    first = base_answers(model, tok, prompts[:2], max_new_tokens=4, cache=cache, show_progress=False)
    everything = base_answers(model, tok, prompts, max_new_tokens=4, cache=cache, show_progress=False)
    assert calls == [2, 1] and everything[:2] == first and everything[3] == everything[0]
    base_answers(model, tok, prompts, max_new_tokens=4, cache=cache, show_progress=False)
    assert calls == [2, 1]  # all cached now
    base_answers(model, tok, prompts, max_new_tokens=5, cache=cache, show_progress=False)
    assert calls == [2, 1, 3]  # other generation settings are other answers


def test_select_rows_by_hand():
    personas = [{"s": 5.0}, {"s": 1.0}, {"s": None}, {"s": 3.0}, {"s": 4.0}]
    assert select_rows(personas, "s", drop_top=0.5) == [1, 3]  # drop 2 of 4 scored: 5.0 and 4.0
    assert select_rows(personas, "s", keep_below=4.0) == [1, 3]
    assert select_rows(personas, "s") == [0, 1, 3, 4]
    with pytest.raises(PersonavecError, match="drop_top=10"):
        select_rows(personas, "s", drop_top=10)


def test_read_labels_names_the_line():
    good = [ChatRecord(CHATS[0], {"y": 1}), ChatRecord(CHATS[0], {"y": 0})]
    assert read_labels(good, "y") == [1, 0]
    with pytest.raises(PersonavecError, match=r"d.jsonl:7: label field 'y' is 0.5"):
        read_labels([ChatRecord(CHATS[0], {"y": 0.5}, where="d.jsonl:7")], "y")


def test_run_screen_writes_scored_filtered_and_report(tiny_llama, tmp_path):
    model, tok = tiny_llama
    vector = random_vector(model)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c, "y": i % 2}) + "\n" for i, c in enumerate(CHATS * 2)))
    records = read_chats(data, require_response=True)
    cfg = ScreenConfig(model="tiny", vector="v", data=str(data), approx=True)
    s = run_screen(cfg, records, vector, model, tok, tmp_path / "scored.jsonl", tmp_path / "run", labels_field="y",
                   drop_top=0.5)
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 6 and all(set(r["persona"]) == {"layer", "response_projection", "approx_projection_difference"}
                                    for r in scored)
    kept = [json.loads(line) for line in (tmp_path / "scored.kept.jsonl").read_text().splitlines()]
    assert len(kept) == 3 and all("persona" not in r for r in kept)
    highest = max(r["persona"]["approx_projection_difference"] for r in scored)
    dropped = [r for r in scored if r["persona"]["approx_projection_difference"] == highest][0]
    assert {"messages": dropped["messages"], "y": dropped["y"]} not in kept
    assert s["mean"]["approx_projection_difference"] == pytest.approx(
        np.mean([r["persona"]["approx_projection_difference"] for r in scored]), abs=1e-5)
    assert set(s["auroc"]) == {"approx_projection_difference", "response_projection"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["filtered"]["kept"] == 3
    assert "<img" in (tmp_path / "run" / "report.html").read_text()


def test_screen_refuses_chats_without_an_answer(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(PersonavecError, match=r"x.jsonl:2: the chat has no final assistant message"):
        screen_records(model, tok, [ChatRecord(CHATS[0]), ChatRecord(CHATS[0][:-1], where="x.jsonl:2")],
                       random_vector(model), ScreenConfig("t", "v", "d", approx=True), show_progress=False)


def test_a_vector_for_another_model_is_refused(tiny_llama):
    model, tok = tiny_llama
    other = PersonaVector(vectors=torch.randn(5, 32), trait="x", layer=2)
    with pytest.raises(PersonavecError, match="made for a model with 4 layers and hidden size 32"):
        monitor_chats(model, tok, [ChatRecord(CHATS[0])], other, show_progress=False)
    with pytest.raises(PersonavecError, match="made for a model with 4 layers"):
        screen_records(model, tok, [ChatRecord(CHATS[0])], other, ScreenConfig("t", "v", "d", approx=True))


# -- shift --------------------------------------------------------------------------

def lora_finetune(model, tok, chats, steps=8, seed=0, lr=5e-3):
    """A few plain LoRA steps on the answers (a stand-in for `personavec finetune` in these tests)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for step in range(steps):
        e = encode_chat(tok, chats[step % len(chats)])
        ids = torch.tensor([e.input_ids])
        labels = ids.clone()
        labels[0, : e.prompt_len] = -100
        loss = peft_model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval()


def test_shift_with_an_adapter_matches_direct_computation(tiny_folder, tmp_path):
    from personavec.models import load_model, model_fingerprint
    from personavec.pipeline.shift import ShiftConfig, run_shift, side_means

    trait = load_trait("optimistic")
    model, tok = load_model(tiny_folder, dtype="fp32")
    vector = random_vector(model, layer=2)
    train = [[{"role": "user", "content": q}, {"role": "assistant", "content": "wonderful great happy " * 3}]
             for q in trait.extract_questions[:4]]
    tuned = lora_finetune(model, tok, train)
    adapter = tmp_path / "adapter"
    tuned.save_pretrained(adapter)
    base_model, _ = load_model(tiny_folder, dtype="fp32")
    base_fp = model_fingerprint(base_model)
    cfg = ShiftConfig(base=tiny_folder, finetuned=str(adapter), vector="v", trait="optimistic", questions=3,
                      max_new_tokens=4, batch_size=2)
    s = run_shift(cfg, trait, vector, base_model, tok, None, tmp_path / "run")

    # independently: hidden_states of the two models at the last prompt token of each question
    fresh, _ = load_model(tiny_folder, dtype="fp32")
    assert model_fingerprint(fresh) == base_fp != model_fingerprint(tuned)
    diffs = []
    for q in trait.eval_questions[:3]:
        e = encode_chat(tok, [{"role": "user", "content": q}], with_response=False)
        diffs.append(hidden_state(tuned, tok, e.input_ids, 2, e.prompt_len - 1)
                     - hidden_state(fresh, tok, e.input_ids, 2, e.prompt_len - 1))
    expected = float(torch.stack(diffs).mean(0) @ (vector.vectors[2] / vector.vectors[2].norm()))
    assert s["shift"]["prompt_last"] == pytest.approx(expected, abs=1e-4)
    assert abs(s["shift"]["prompt_last"]) > 1e-4  # training moved something
    assert len(s["per_layer"]["response_avg"]["projection"]) == 4
    # the same model on both sides: no shift at all
    same = side_means(fresh, tok, list(trait.eval_questions[:3]), None)
    assert (same.prompt_last - side_means(fresh, tok, list(trait.eval_questions[:3]), None).prompt_last).abs().max() == 0
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "answers.jsonl").exists()


def test_adapter_for_another_base_is_refused(tmp_path):
    from personavec.pipeline.shift import ADAPTER_META, attach_adapter
    from personavec.models import model_fingerprint

    model, tok = _tiny("llama", seed=0)
    tuned = lora_finetune(model, tok, CHATS, steps=2)
    adapter = tmp_path / "adapter"
    tuned.save_pretrained(adapter)
    (adapter / ADAPTER_META).write_text(json.dumps({"base_model": "tiny-0", "base_fingerprint": "0" * 16}))
    other, _ = _tiny("llama", seed=1)
    with pytest.raises(PersonavecError, match="adapter was trained on 'tiny-0', not on --base tiny-1"):
        attach_adapter(other, adapter, "tiny-1")
    (adapter / ADAPTER_META).unlink()
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(PersonavecError, match="adapter does not fit --base wider"):
        attach_adapter(wider, adapter, "wider")
    assert model_fingerprint(other) != model_fingerprint(_tiny("llama", seed=0)[0])


# -- the commands ---------------------------------------------------------------------

@pytest.fixture
def cli_setup(tiny_folder, tmp_path, monkeypatch):
    from personavec.models import load_model

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(tiny_folder, dtype="fp32")
    vector_path = tmp_path / "v.safetensors"
    random_vector(model, layer=2).save(vector_path)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": c, "id": i, "y": i % 2}) + "\n" for i, c in enumerate(CHATS)))
    return tiny_folder, vector_path, data


def test_monitor_and_screen_commands_follow_the_contract(cli_setup, tmp_path, capsys):
    from test_cli import run_cli

    folder, vector_path, data = cli_setup
    code, out, err = run_cli(capsys, "monitor", "--model", folder, "--vector", vector_path, "--input", data,
                             "--output", tmp_path / "mon.jsonl", "--threshold", "0", "--scores", "id")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "mon.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert {"trait", "layer", "projection"} <= set(rows[0]["persona"]) and rows[0]["persona"]["layer"] == 2
    assert "Pearson r" in err and (tmp_path / "mon_run" / "report.html").exists()

    code, out, err = run_cli(capsys, "screen", "--model", folder, "--vector", vector_path, "--data", data,
                             "--output", tmp_path / "scored.jsonl", "--layer", "1", "--max-new-tokens", "4",
                             "--labels", "y", "--keep-below", "1e9")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert set(rows[0]["persona"]) == {"layer", "response_projection", "approx_projection_difference",
                                       "projection_difference"} and rows[0]["persona"]["layer"] == 1
    assert "AUROC against y" in err and len((tmp_path / "scored.kept.jsonl").read_text().splitlines()) == 3
    summary = json.loads((tmp_path / "scored_run" / "summary.json").read_text())
    assert summary["rank_by"] == "projection_difference" and summary["layer"] == 1


def test_screen_command_errors_are_one_line(cli_setup, tmp_path, capsys):
    from test_cli import run_cli

    folder, vector_path, data = cli_setup
    no_answer = tmp_path / "bad.jsonl"
    no_answer.write_text(data.read_text() + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code, _, err = run_cli(capsys, "screen", "--model", folder, "--vector", vector_path, "--data", no_answer,
                           "--output", tmp_path / "o.jsonl", "--approx")
    assert code == 2 and err.strip().splitlines()[-1] == f"error: {no_answer}:4: the chat has no final assistant " \
        "message (needed here as the response)"
    assert not (tmp_path / "o.jsonl").exists()
    code, _, err = run_cli(capsys, "shift", "--base", folder, "--finetuned", folder, "--vector", vector_path,
                           "--engine", "vllm", "--out", tmp_path / "s")
    assert code == 2 and "shift compares two models" in err and not (tmp_path / "s").exists()
    code, _, err = run_cli(capsys, "screen", "--model", folder, "--vector", vector_path, "--data", data,
                           "--output", tmp_path / "o.jsonl", "--approx", "--drop-top", "0.1", "--keep-below", "1")
    assert code == 2 and "either --drop-top or --keep-below" in err
    code, _, err = run_cli(capsys, "monitor", "--model", folder, "--vector", vector_path, "--input", data,
                           "--output", tmp_path / "o.jsonl", "--layer", "9")
    assert code == 2 and "--layer 9 is out of range" in err


def test_monitor_study_without_judge(cli_setup, tmp_path, capsys):
    from test_cli import run_cli

    folder, vector_path, _ = cli_setup
    code, _, err = run_cli(capsys, "monitor", "--model", folder, "--vector", vector_path, "--study", "system-prompts",
                           "--questions", "2", "--out", tmp_path / "study")
    assert code == 0, err
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert [e["condition"] for e in summary["per_condition"]][0] == "suppress-strong"
    assert "pearson" not in summary  # no judge: projections only
    assert len((tmp_path / "study" / "study.jsonl").read_text().splitlines()) == 12


def test_many_shot_study_with_a_judge_resumes(tiny_folder, tmp_path):
    from test_pipeline import ConstantJudge

    from personavec.models import load_model
    from personavec.pipeline.monitor import run_study

    model, tok = load_model(tiny_folder, dtype="fp32")
    vector = random_vector(model)
    trait = load_trait("optimistic")
    cfg = StudyConfig(study="many-shot", model="tiny", trait="optimistic", vector="v", judge="test", questions=2,
                      shots=[0, 2], max_new_tokens=3, batch_size=4)
    judge = ConstantJudge(cache=tmp_path / "judge.sqlite")
    s = run_study(cfg, trait, vector, model, tok, judge, tmp_path / "run")
    assert [e["condition"] for e in s["per_condition"]] == ["0-shot", "2-shot"]
    assert s["per_condition"][0]["trait_score_mean"] == pytest.approx(80.0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "study.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["answer"] is not None and r["trait_score"] == 80.0 for r in rows)
    assert len((tmp_path / "run" / "shots.jsonl").read_text().splitlines()) == 20
    calls = judge.stats["calls"]
    again = run_study(cfg, trait, vector, model, tok, judge, tmp_path / "run")  # resumes: nothing new to judge
    assert judge.stats["calls"] == calls and again["per_condition"] == s["per_condition"]


def test_shift_command_with_an_adapter(cli_setup, tmp_path, capsys):
    from test_cli import run_cli

    from personavec.models import load_model

    folder, vector_path, data = cli_setup
    model, tok = load_model(folder, dtype="fp32")
    lora_finetune(model, tok, CHATS, steps=4).save_pretrained(tmp_path / "adapter")
    code, out, err = run_cli(capsys, "shift", "--base", folder, "--finetuned", tmp_path / "adapter", "--vector",
                             vector_path, "--questions", "2", "--max-new-tokens", "3", "--out", tmp_path / "shift")
    assert code == 0, err
    assert "prompt_last shift along optimistic at layer 2" in err and "response_avg shift" in err
    summary = json.loads((tmp_path / "shift" / "summary.json").read_text())
    assert set(summary["shift"]) == {"prompt_last", "response_avg"}
    # a different run into the same folder is refused
    code, _, err = run_cli(capsys, "shift", "--base", folder, "--finetuned", tmp_path / "adapter", "--vector",
                           vector_path, "--questions", "3", "--out", tmp_path / "shift")
    assert code == 2 and "holds a different run" in err


def test_engine_flag_errors_are_one_line(cli_setup, tmp_path, capsys):
    from test_cli import run_cli

    from personavec.backends.vllm import vllm_available

    folder, vector_path, data = cli_setup
    base = ["screen", "--model", folder, "--vector", vector_path, "--data", data, "--output", tmp_path / "o.jsonl"]
    code, _, err = run_cli(capsys, *base, "--engine", "tpu")
    assert code == 2 and "error: --engine 'tpu': use hf or vllm" in err
    code, _, err = run_cli(capsys, *base, "--tensor-parallel-size", "2")
    assert code == 2 and "--tensor-parallel-size needs --engine vllm" in err
    if not vllm_available():
        code, _, err = run_cli(capsys, *base, "--engine", "vllm")
        assert code == 2 and "--engine vllm needs vLLM: `pip install 'personavec[vllm]'`" in err
    assert not (tmp_path / "o.jsonl").exists()
    code, _, err = run_cli(capsys, "shift", "--base", folder, "--finetuned", folder, "--vector", vector_path,
                           "--engine", "vllm", "--out", tmp_path / "s")
    assert code == 2 and "shift compares two models" in err and not (tmp_path / "s").exists()


def test_folder_fingerprint_equals_the_loaded_models(tiny_folder):
    """The vLLM engine fingerprints the weight files; it must name the same checkpoint as the loaded model."""
    from personavec.models import folder_fingerprint, load_model, model_fingerprint, n_layers

    model, _ = load_model(tiny_folder, dtype="fp32")
    assert folder_fingerprint(tiny_folder, model.config, n_layers(model)) == model_fingerprint(model)
    bf16, _ = load_model(tiny_folder, dtype="bf16")
    assert model_fingerprint(bf16) == model_fingerprint(model)


def test_engine_steering_handles_nest_and_steerings_key_exactly():
    """Without vLLM: the engine-side bookkeeping that `add_vectors` and per-chat steerings rely on."""
    from personavec.backends.base import Steering
    from personavec.backends.vllm import VllmBackend
    from personavec.steering import add_vectors

    engine = object.__new__(VllmBackend)  # no vLLM here: only the handle bookkeeping is exercised
    engine.n_blocks, engine.active = 3, []
    with add_vectors(engine, {1: torch.ones(4)}) as outer:
        with add_vectors(engine, {2: torch.ones(4)}) as inner:
            assert engine.active == [outer.steering, inner.steering]
        assert engine.active == [outer.steering]
    assert engine.active == []
    # same norm and same sum, different vectors: different steering
    a, b = Steering({1: torch.tensor([1.0, 0.0])}), Steering({1: torch.tensor([0.0, 1.0])})
    assert a.key() != b.key() and a.key() == Steering({1: torch.tensor([1.0, 0.0])}).key()
    assert Steering({1: torch.tensor([1.0, 0.0])}, "prompt").key() != a.key()
