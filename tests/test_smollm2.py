"""Integration tests on the packaged smollm2-135m (fetched once per machine into the cache)."""

import pytest
import torch

from personavec.activations import capture
from personavec.chat import user_chat
from personavec.generate import generate
from personavec.models import load_model
from personavec.pipeline.contrast import builtin_contrast, contrastive_vector
from personavec.vecmath import project

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_contrastive_vector_separates_held_out_chats(smollm):
    model, tok = smollm
    pos, neg = builtin_contrast()
    vector, seps = contrastive_vector(model, tok, pos[:12], neg[:12], trait="optimistic", show_progress=False)
    layer = vector.layer
    held_pos = capture(model, tok, pos[12:], layers=[layer], show_progress=False).response_avg[:, 0]
    held_neg = capture(model, tok, neg[12:], layers=[layer], show_progress=False).response_avg[:, 0]
    p, n = project(held_pos, vector.vectors[layer]), project(held_neg, vector.vectors[layer])
    assert (p > n).sum() >= 3, (p, n)  # pairs share a question: the optimistic answer projects higher
    assert p.mean() > n.max() or p.min() > n.mean()


def test_steering_changes_greedy_output(smollm):
    model, tok = smollm
    pos, neg = builtin_contrast()
    vector, _ = contrastive_vector(model, tok, pos, neg, show_progress=False)
    chats = [user_chat("What do you think the next ten years will bring?")]
    plain = generate(model, tok, chats, max_new_tokens=24, show_progress=False)
    with vector.apply(model, coef=0.4, coef_mode="norm"):
        steered = generate(model, tok, chats, max_new_tokens=24, show_progress=False)
    again = generate(model, tok, chats, max_new_tokens=24, show_progress=False)
    assert steered != plain
    assert again == plain  # the hooks are gone


def test_bf16_capture_agrees_with_hidden_states(smollm):
    model, tok = smollm
    pos, _ = builtin_contrast()
    acts = capture(model, tok, pos[:4], show_progress=False)
    from personavec.chat import encode_chat

    enc = encode_chat(tok, pos[0])
    with torch.no_grad():
        hs = torch.stack(model(torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states)[:, 0].float()
    ref = hs[:, enc.prompt_len:].mean(1)
    cos = torch.nn.functional.cosine_similarity(acts.response_avg[0], ref, dim=-1)
    assert cos.min() > 0.999


def test_monitor_projection_rises_with_what_the_system_prompt_asks(smollm):
    from personavec.pipeline.monitor import StudyConfig, study_items, study_summary
    from personavec.pipeline.project import project_chats
    from personavec.traits import load_trait

    model, tok = smollm
    pos, neg = builtin_contrast()
    vector, _ = contrastive_vector(model, tok, pos, neg, trait="optimistic", show_progress=False)
    items = study_items(StudyConfig(study="system-prompts", model="", trait="optimistic", vector="", judge="none",
                                    questions=6), load_trait("optimistic"))
    values = project_chats(model, tok, [it["messages"] for it in items], vector, vector.layer,
                           show_progress=False)["prompt_last"]
    rows = [{**it, "projection": v} for it, v in zip(items, values)]
    per = {e["condition"]: e["projection"]["mean"] for e in study_summary(rows)["per_condition"]}
    assert per["elicit-strong"] > per["neutral"] > per["suppress-strong"], per
    assert study_summary(rows)["projection_vs_level_spearman"] > 0.3


def test_gate_fails_a_trait_inducing_finetune_and_passes_a_neutral_one(smollm, tmp_path):
    """Three LoRA steps on 24 plainly optimistic answers vs on neutral answers to the same questions."""
    from pathlib import Path

    from personavec.chat import read_chats
    from personavec.pipeline.finetune import FinetuneConfig, run_finetune
    from personavec.pipeline.gate import GateLimits, run_gate

    base, tok = smollm
    pos, neg = builtin_contrast()
    vector, _ = contrastive_vector(base, tok, pos, neg, trait="optimistic", show_progress=False)
    (tmp_path / "vectors").mkdir()
    vector.save(tmp_path / "vectors" / "optimistic.safetensors")
    data = Path(__file__).parent.parent / "experiments" / "data"
    folder = base.name_or_path
    verdicts = {}
    for name in ("optimistic", "neutral"):
        candidate, _ = load_model("smollm2-135m")
        cfg = FinetuneConfig(model="smollm2-135m", data=name, learning_rate=2e-3, batch_size=8, grad_accum=1,
                             warmup_steps=1)
        run_finetune(cfg, read_chats(data / f"{name}_train.jsonl")[:24], candidate, tok, tmp_path / f"ft-{name}",
                     show_progress=False)
        verdicts[name] = run_gate(folder, name, ["optimistic"], tmp_path / "vectors", GateLimits(max_shift=0.05), base,
                                  candidate, tok, None, "none", tmp_path / f"gate-{name}", questions=10)
    assert not verdicts["optimistic"]["passed"], verdicts["optimistic"]["traits"]
    assert "exceeds --max-shift 0.05" in verdicts["optimistic"]["failures"][0]
    assert verdicts["neutral"]["passed"], verdicts["neutral"]["traits"]
    assert verdicts["optimistic"]["traits"][0]["shift"] > verdicts["neutral"]["traits"][0]["shift"]


@pytest.mark.slow  # 74 s where bf16 runs natively, 322 s in fp32 on an AVX2-only CPU: `make test-slow`
def test_profile_compare_finds_a_lora_trained_on_trait_answers_higher(smollm, tmp_path, capsys):
    """`profile --compare ADAPTER`: six LoRA steps on 48 optimistic answers raise the optimistic reading, with
    an interval that excludes 0; the same steps on neutral answers to the same questions raise it less. (Three
    steps on 24 answers passed until 2026-12-02, when a fresh install gave +0.17 with an interval over 0: too
    close to the noise of 10 questions to test the command.)"""
    import json
    from pathlib import Path

    from test_cli import run_cli

    from personavec.chat import read_chats
    from personavec.pipeline.finetune import FinetuneConfig, run_finetune

    base, tok = smollm
    pos, neg = builtin_contrast()
    vector, _ = contrastive_vector(base, tok, pos, neg, trait="optimistic", show_progress=False)
    vector.model = "smollm2-135m"
    (tmp_path / "vectors").mkdir()
    vector.save(tmp_path / "vectors" / "optimistic.safetensors")
    data = Path(__file__).parent.parent / "experiments" / "data"
    difference = {}
    for name in ("optimistic", "neutral"):
        candidate, _ = load_model("smollm2-135m")
        cfg = FinetuneConfig(model="smollm2-135m", data=name, learning_rate=2e-3, batch_size=8, grad_accum=1,
                             warmup_steps=1)
        adapter = run_finetune(cfg, read_chats(data / f"{name}_train.jsonl")[:48], candidate, tok,
                               tmp_path / f"ft-{name}", show_progress=False).adapter
        del candidate
        code, _, err = run_cli(capsys, "profile", "--model", "smollm2-135m", "--vectors", tmp_path / "vectors",
                               "--traits", "optimistic", "--compare", adapter, "--questions", "10",
                               "--max-new-tokens", "32", "--bootstrap", "500", "--out", tmp_path / f"profile-{name}")
        assert code == 0, err
        trait = json.loads((tmp_path / f"profile-{name}" / "summary.json").read_text())["traits"]["optimistic"]
        difference[name] = trait
    assert difference["optimistic"]["difference"] > 0 and difference["optimistic"]["significant"], difference
    assert difference["optimistic"]["difference"] > difference["neutral"]["difference"], difference
