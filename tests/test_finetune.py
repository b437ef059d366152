"""finetune and gate on tiny random models: the loss by hand, hooks only during training, resume, errors."""

import json

import pytest
import torch
from conftest import CHATS

from personavec.chat import ChatRecord, encode_chat
from personavec.errors import PersonavecError
from personavec.models import load_model
from personavec.pipeline.finetune import (Example, FinetuneConfig, collate, lr_factor, masked_loss, run_finetune,
                                          training_edit, training_hooks)
from personavec.steering import ablate_directions
from personavec.vectors import PersonaVector

TRAIN = [ChatRecord(c, where=f"train.jsonl:{i + 1}") for i, c in enumerate(CHATS * 3)]


def vector_for(model, layer=2, seed=0):
    from personavec.models import hidden_size, n_layers

    g = torch.Generator().manual_seed(seed)
    return PersonaVector(vectors=torch.randn(n_layers(model) + 1, hidden_size(model), generator=g), trait="optimistic",
                         layer=layer, coef=1.0, coef_mode="raw", norms=torch.ones(n_layers(model) + 1))


def cfg(folder, **kw):
    return FinetuneConfig(**{**dict(model=folder, data="train.jsonl", rank=4, alpha=8, learning_rate=1e-2, epochs=2,
                                    batch_size=2, grad_accum=2, warmup_steps=1, dtype="fp32"), **kw})


def test_collate_masks_prompt_and_padding():
    batch = collate([Example([5, 6, 7, 8], 2), Example([9, 10], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_lr_factor_by_hand():
    assert [lr_factor(s, 2, 6) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_masked_loss_matches_transformers_loss(tiny):
    model, tok = tiny
    examples = [Example(encode_chat(tok, c).input_ids, encode_chat(tok, c).prompt_len) for c in CHATS]
    batch = collate(examples, tok.pad_token_id)
    ours, n = masked_loss(model, batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == sum(len(e.input_ids) - e.prompt_len for e in examples)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_ablation_removes_the_direction(tiny_llama):
    model, tok = tiny_llama
    direction = torch.randn(64)
    ids = torch.tensor([encode_chat(tok, CHATS[1]).input_ids])
    with ablate_directions(model, {2: direction}):
        h = model(input_ids=ids, output_hidden_states=True).hidden_states
    plain = model(input_ids=ids, output_hidden_states=True).hidden_states
    unit = direction / direction.norm()
    assert (h[2][0] @ unit).abs().max() < 1e-4  # nothing left along it at layer 2
    expected = plain[2][0] - (plain[2][0] @ unit)[:, None] * unit
    assert torch.allclose(h[2][0], expected, atol=1e-5)


def test_steer_layers_all_adds_layer_increments(tiny_llama):
    model, _ = tiny_llama
    vector = vector_for(model)
    edit = training_edit(model, cfg("m", steer="v", coef=2.0, steer_layers="all"), vector)
    handle = training_hooks(model, edit)
    try:
        assert edit[0] == "steer"
        assert sorted(handle.deltas) == [1, 2, 3]
        for layer in (1, 2, 3):
            assert torch.allclose(handle.deltas[layer], 2.0 * (vector.vectors[layer] - vector.vectors[layer - 1]))
    finally:
        handle.remove()


def test_finetune_learns_saves_a_hookless_adapter_and_steering_changes_training(tiny_folder, tmp_path):
    from peft import PeftModel

    model, tok = load_model(tiny_folder, dtype="fp32")
    vector = vector_for(model)
    plain = run_finetune(cfg(tiny_folder), TRAIN, model, tok, tmp_path / "plain", show_progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "plain" / "losses.jsonl").read_text().splitlines()]
    assert plain.summary["steps"] == 6 and losses[-1] < losses[0]
    meta = json.loads((plain.adapter / "personavec_adapter.json").read_text())
    assert meta["base_model"] == tiny_folder and len(meta["base_fingerprint"]) == 16

    steered_model, _ = load_model(tiny_folder, dtype="fp32")
    steered = run_finetune(cfg(tiny_folder, steer="v.safetensors", coef=4.0), TRAIN, steered_model, tok,
                           tmp_path / "steered", vector=vector, show_progress=False)
    steered_losses = [json.loads(line)["loss"] for line in (tmp_path / "steered" / "losses.jsonl").read_text().splitlines()]
    assert steered_losses[0] != pytest.approx(losses[0])  # the hook was live during training
    # the trained in-memory model has no hook left, and the saved adapter reproduces it exactly
    ids = torch.tensor([encode_chat(tok, CHATS[0]).input_ids])
    with torch.no_grad():
        in_memory = steered_model(input_ids=ids).logits
        fresh, _ = load_model(tiny_folder, dtype="fp32")
        reloaded = PeftModel.from_pretrained(fresh, str(steered.adapter)).eval()(input_ids=ids).logits
    assert torch.allclose(in_memory, reloaded, atol=1e-5)
    assert json.loads((tmp_path / "steered" / "summary.json").read_text())["preventative"]["coef"] == 4.0
    assert (tmp_path / "steered" / "report.html").exists() and not (tmp_path / "steered" / "checkpoint").exists()


def test_a_killed_run_resumes_to_the_same_adapter(tiny_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import personavec.pipeline.finetune as finetune

    config = cfg(tiny_folder, checkpoint_every=2, epochs=3)
    model, tok = load_model(tiny_folder, dtype="fp32")
    run_finetune(config, TRAIN, model, tok, tmp_path / "whole", show_progress=False)

    real_save = finetune._save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        if args[3] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_save_checkpoint", save_then_die)
    model, tok = load_model(tiny_folder, dtype="fp32")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, TRAIN, model, tok, tmp_path / "killed", show_progress=False)
    assert not (tmp_path / "killed" / "adapter").exists()
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(finetune, "_save_checkpoint", real_save)
    model, tok = load_model(tiny_folder, dtype="fp32")
    resumed = run_finetune(config, TRAIN, model, tok, tmp_path / "killed", show_progress=False)
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(resumed.adapter / "adapter_model.safetensors"))
    assert whole.keys() == again.keys()
    for key in whole:
        assert torch.allclose(whole[key], again[key], atol=1e-6), key
    assert resumed.summary["steps"] == 9


def test_finetune_refuses_bad_input(tiny_folder, tmp_path):
    model, tok = load_model(tiny_folder, dtype="fp32")
    with pytest.raises(PersonavecError, match="coef= needs steer="):
        run_finetune(cfg(tiny_folder, coef=1.0), TRAIN, model, tok, tmp_path / "a")
    with pytest.raises(PersonavecError, match="made for a model with 4 layers and hidden size 32"):
        run_finetune(cfg(tiny_folder, steer="v", coef=1.0), TRAIN, model, tok, tmp_path / "a",
                     vector=PersonaVector(vectors=torch.randn(5, 32), layer=2))
    with pytest.raises(PersonavecError, match=r"train.jsonl:9: the chat has no final assistant message"):
        run_finetune(cfg(tiny_folder), TRAIN[:8] + [ChatRecord(CHATS[0][:-1], where="train.jsonl:9")], model, tok,
                     tmp_path / "a")
    with pytest.raises(PersonavecError, match="no chat fits max_length=3"):
        run_finetune(cfg(tiny_folder, max_length=3), TRAIN, model, tok, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing written for refused input
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"command": "finetune", "model": "other"}))
    with pytest.raises(PersonavecError, match="holds a different run"):
        run_finetune(cfg(tiny_folder), TRAIN, model, tok, tmp_path / "b")


def test_finetune_command_errors(tiny_folder, tmp_path, capsys):
    from test_cli import run_cli

    data = tmp_path / "d.jsonl"
    data.write_text("")
    code, _, err = run_cli(capsys, "finetune", "--model", tiny_folder, "--data", data, "--out", tmp_path / "o")
    assert code == 2 and f"error: {data}: no chats in the file" in err
    code, _, err = run_cli(capsys, "finetune", "--model", tiny_folder, "--data", data, "--out", tmp_path / "o",
                           "--coef", "2")
    assert code == 2 and "--coef needs --steer" in err
    data.write_text(json.dumps({"messages": CHATS[0][:-1]}) + "\n")
    code, _, err = run_cli(capsys, "finetune", "--model", tiny_folder, "--data", data, "--out", tmp_path / "o")
    assert code == 2 and f"{data}:1: the chat has no final assistant message" in err


def test_gate_passes_an_unchanged_candidate_and_fails_a_moved_one(tiny_folder, tmp_path, capsys, monkeypatch):
    """Mechanics on a random model: the fine-tune moves the model; a vector along that move must fail the gate,
    a vector orthogonal to it must pass (the real-trait version runs on smollm2 in test_smollm2)."""
    from test_cli import run_cli

    from personavec.pipeline.shift import side_means
    from personavec.traits import load_trait

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 4))
    code, _, err = run_cli(capsys, "finetune", "--model", tiny_folder, "--data", data, "--out", tmp_path / "ft",
                           "--dtype", "fp32", "--lr", "1e-2", "--epochs", "2", "--rank", "4")
    assert code == 0, err
    adapter = tmp_path / "ft" / "adapter"

    base, tok = load_model(tiny_folder, dtype="fp32")
    from personavec.pipeline.shift import attach_adapter

    questions = list(load_trait("optimistic").eval_questions[:3])
    moved = side_means(attach_adapter(load_model(tiny_folder, dtype="fp32")[0], adapter, tiny_folder), tok,
                       questions, None).prompt_last - side_means(base, tok, questions, None).prompt_last
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    PersonaVector(vectors=moved.clone(), trait="optimistic", layer=2).save(vectors / "optimistic.safetensors")
    orthogonal = torch.randn_like(moved)
    orthogonal -= (orthogonal * moved).sum(-1, keepdim=True) / (moved * moved).sum(-1, keepdim=True).clamp(min=1e-12) * moved
    PersonaVector(vectors=orthogonal, trait="humorous", layer=2).save(vectors / "humorous.safetensors")

    args = ["gate", "--base", tiny_folder, "--candidate", adapter, "--vectors", vectors, "--questions", "3",
            "--dtype", "fp32", "--max-shift", "0.5"]
    code, out, err = run_cli(capsys, *args, "--traits", "humorous", "--out", tmp_path / "g1")
    assert code == 0, err
    assert "gate passed" in err
    code, out, err = run_cli(capsys, *args, "--traits", "optimistic,humorous", "--out", tmp_path / "g2")
    assert code == 1
    failed = [line for line in err.splitlines() if line.startswith("gate failed:")]
    assert len(failed) == 1 and "optimistic: shift +1.000 of the vector's length at layer 2 exceeds --max-shift 0.5" \
        in failed[0]
    verdict = json.loads((tmp_path / "g2" / "gate.json").read_text())
    assert [t["passed"] for t in verdict["traits"]] == [False, True]
    code, _, err = run_cli(capsys, *args[:-2], "--traits", "optimistic", "--out", tmp_path / "g3")
    assert code == 2 and "needs a limit" in err
    code, _, err = run_cli(capsys, *args, "--traits", "evil", "--out", tmp_path / "g4")
    assert code == 2 and "no vector for trait 'evil'" in err



def test_trait_verdict_by_hand():
    from personavec.pipeline.gate import GateLimits, trait_verdict

    result = {"trait": "evil", "layer": 4, "relative_shift": 0.2, "trait_score_change": 12.0}
    assert trait_verdict(result, GateLimits(max_shift=0.3)) == []
    reasons = trait_verdict(result, GateLimits(max_shift=0.1, max_score_increase=10))
    assert reasons == ["evil: shift +0.200 of the vector's length at layer 4 exceeds --max-shift 0.1",
                       "evil: judged score rose by +12.0 points, more than --max-score-increase 10"]
    assert trait_verdict({**result, "trait_score_change": None}, GateLimits(max_score_increase=1)) == []
    with pytest.raises(PersonavecError, match="--max-score-increase needs --judge"):
        GateLimits(max_score_increase=5).check(judged=False)
