"""`profile`: readings against an independent forward, the 0..1 scale, self-comparison, the CLI contract."""

import json
import zlib

import pytest
import torch
from conftest import _tiny

from personavec.chat import encode_chat
from personavec.errors import PersonavecError
from personavec.judge import Judge
from personavec.generate import generate
from personavec.pipeline.profile import ProfileConfig, read_model, summarise
from personavec.traits import load_trait
from personavec.vectors import PersonaVector


def tiny_vector(trait: str, layer: int, seed: int) -> PersonaVector:
    torch.manual_seed(seed)
    vectors = torch.randn(4, 64)
    stats = torch.tensor([[1.0, 0.5, -1.0, 0.5]] * 4)  # pos mean 1, neg mean -1 at every layer
    return PersonaVector(vectors=vectors, trait=trait, layer=layer, projection_stats=stats, norms=torch.full((4,), 2.0))


def test_readings_equal_an_independent_forward(tiny_llama):
    model, tok = tiny_llama
    traits = {name: (load_trait(name), tiny_vector(name, layer, seed))
              for name, layer, seed in (("optimistic", 2, 0), ("evil", 3, 1))}
    readings = read_model(model, tok, traits, questions=3, max_new_tokens=6, show_progress=False)
    for name, (trait, vector) in traits.items():
        entry = readings[name]
        questions = list(trait.eval_questions[:3])
        answers = generate(model, tok, [[{"role": "user", "content": q}] for q in questions], max_new_tokens=6,
                           show_progress=False)
        assert entry["answers"] == answers
        u = vector.vectors[vector.layer] / vector.vectors[vector.layer].norm()
        for i, (q, a) in enumerate(zip(questions, answers)):
            chat = [{"role": "user", "content": q}, {"role": "assistant", "content": a or " "}]
            enc = encode_chat(tok, chat)
            with torch.no_grad():
                hidden = model(torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states[vector.layer][0]
            response = float(hidden[enc.prompt_len:].mean(0) @ u)
            prompt = float(hidden[enc.prompt_len - 1] @ u)
            assert entry["response"][i] == pytest.approx(response, abs=1e-4)
            assert entry["prompt"][i] == pytest.approx(prompt, abs=1e-4)
            assert entry["response_scaled"][i] == pytest.approx((response + 1) / 2, abs=1e-4)  # 0..1 from -1..1


def test_comparing_a_model_with_itself_gives_zero_differences(tiny_llama):
    model, tok = tiny_llama
    traits = {"optimistic": (load_trait("optimistic"), tiny_vector("optimistic", 2, 0))}
    readings = read_model(model, tok, traits, questions=4, max_new_tokens=4, show_progress=False)
    cfg = ProfileConfig(model="m", traits=["optimistic"], compare="m", bootstrap=500)
    summary = summarise(readings, cfg, readings)
    trait = summary["traits"]["optimistic"]
    assert trait["difference"] == 0.0 and trait["significant"] is False
    low, high = trait["differences"]["response_scaled"]["ci"]
    assert low <= 0.0 <= high
    shifted = {"optimistic": {**readings["optimistic"],
                              "response_scaled": [v + 0.5 for v in readings["optimistic"]["response_scaled"]]}}
    moved = summarise(readings, cfg, shifted)["traits"]["optimistic"]
    assert moved["difference"] == pytest.approx(0.5) and moved["significant"] is True


def test_vector_for_another_model_is_refused(tiny_llama):
    model, tok = tiny_llama
    wrong = PersonaVector(vectors=torch.randn(9, 32), trait="optimistic", layer=2)
    with pytest.raises(PersonavecError, match="made for a model with 8 layers"):
        read_model(model, tok, {"optimistic": (load_trait("optimistic"), wrong)}, questions=1, show_progress=False)


def test_profile_cli_contract_and_bad_input(tiny_folder, tmp_path, capsys):
    from test_cli import run_cli

    vectors = tmp_path / "vectors"
    vectors.mkdir()
    tiny_vector("optimistic", 2, 0).save(vectors / "optimistic.safetensors")
    tiny_vector("humorous", 3, 1).save(vectors / "humorous.safetensors")
    base = ["profile", "--model", tiny_folder, "--vectors", vectors, "--questions", "3", "--max-new-tokens", "4",
            "--bootstrap", "200"]
    code, out, err = run_cli(capsys, *base, "--out", tmp_path / "p", "--compare", tiny_folder)
    assert code == 0, err
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert set(summary["traits"]) == {"optimistic", "humorous"}
    for trait in summary["traits"].values():
        assert isinstance(trait["difference"], float) and trait["difference"] == 0.0
        scaled = trait["response_scaled"]
        assert scaled["ci"][0] <= scaled["mean"] <= scaled["ci"][1] and scaled["n"] == 3
    assert "data:image/png;base64" in (tmp_path / "p" / "report.html").read_text()
    code, _, err = run_cli(capsys, *base, "--steer", "all", "--out", tmp_path / "s")
    assert code == 0, err
    cross = json.loads((tmp_path / "s" / "summary.json").read_text())["cross_traits"]
    assert set(cross["effect"]) == {"optimistic", "humorous"} and set(cross["effect"]["humorous"]) == set(cross["cosine"])
    assert (tmp_path / "s" / "report.html").read_text().count("data:image/png;base64") == 2
    code, _, err = run_cli(capsys, *base, "--steer", "evil", "--out", tmp_path / "t")
    assert code == 2 and "--steer: 'evil' is not among the profiled traits" in err
    code, _, err = run_cli(capsys, *base, "--traits", "evil", "--out", tmp_path / "q")
    assert code == 2 and "no vector for trait 'evil'" in err and not (tmp_path / "q").exists()
    # an adapter made for another base
    from peft import LoraConfig, get_peft_model

    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=_tiny("llama")[0].config.vocab_size, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))  # another base: hidden size 32, not 64
    adapter = tmp_path / "adapter"
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    code, _, err = run_cli(capsys, *base, "--compare", adapter, "--out", tmp_path / "r")
    assert code == 2 and "adapter does not fit" in err


class HashJudge(Judge):
    """Scores a prompt by a hash of it, so different answers get different scores."""

    spec, identity = "test:hash", "v1"

    def _compute(self, prompts, done):
        for prompt in prompts:
            done(prompt, {"expected": float(zlib.crc32(prompt.encode()) % 101), "mass": 1.0, "refused": False})


def test_cross_trait_effects_equal_separate_steered_runs(tiny_llama, tmp_path):
    from personavec.activations import capture
    from personavec.judge import judge_answers
    from personavec.pipeline.profile import cross_traits
    from personavec.steering import add_vectors

    model, tok = tiny_llama
    traits = {name: (load_trait(name), tiny_vector(name, layer, seed))
              for name, layer, seed in (("optimistic", 2, 0), ("evil", 3, 1))}
    judge = HashJudge(cache=tmp_path / "judge.sqlite")
    cross = cross_traits(model, tok, traits, ["optimistic"], questions=2, max_new_tokens=4, show_progress=False,
                         judge=judge)
    questions = list(dict.fromkeys(q for t, _ in traits.values() for q in t.eval_questions[:2]))
    chats = [[{"role": "user", "content": q}] for q in questions]

    def mean_reading(answers, vector):
        acts = capture(model, tok, [c + [{"role": "assistant", "content": a or " "}] for c, a in zip(chats, answers)],
                       layers=[vector.layer], positions=("response_avg",), show_progress=False)
        value = float((acts.response_avg[:, 0] @ (vector.vectors[vector.layer] / vector.vectors[vector.layer].norm())).mean())
        return vector.scaled(value)

    plain = generate(model, tok, chats, max_new_tokens=4, show_progress=False)
    steering = traits["optimistic"][1]
    with add_vectors(model, {2: steering.delta(2, 0.5, "norm")}):
        steered = generate(model, tok, chats, max_new_tokens=4, show_progress=False)
    for name, (trait, vector) in traits.items():
        expected = mean_reading(steered, vector) - mean_reading(plain, vector)
        assert cross["effect"]["optimistic"][name] == pytest.approx(expected, abs=1e-4)

        # judged: T's score on the answers to T's own questions, steered minus unsteered
        def judged(answers):
            own = [(q, answers[questions.index(q)] or " ") for q in trait.eval_questions[:2]]
            scores = [s["trait_score"] for s in judge_answers(judge, trait, own, coherence=False)]
            return sum(scores) / len(scores)
        assert cross["judged_effect"]["optimistic"][name] == pytest.approx(judged(steered) - judged(plain))
        assert cross["judged_unsteered"][name] == pytest.approx(judged(plain))
    assert plain != steered and any(cross["judged_effect"]["optimistic"][n] != 0 for n in traits)
    from personavec.pipeline.profile import _heatmaps

    cross["judged_effect"]["optimistic"]["evil"] = None  # a trait the judge could not score is drawn as n/a
    titles = [ax.get_title() for ax in _heatmaps(cross).axes]
    assert any("judged" in t for t in titles) and any("cosine" in t for t in titles)
    assert cross["cosine"]["evil"]["evil"] == pytest.approx(1.0)
    assert cross["steered"]["optimistic"] == {"coef": 0.5, "coef_mode": "norm", "layer": 2}
