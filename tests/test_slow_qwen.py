"""Slow model tests on qwen2.5-coder-0.5b: `make test-slow` (not in CI's default run)."""

import pytest

from personavec.chat import user_chat
from personavec.generate import generate
from personavec.models import load_model
from personavec.pipeline.extract import ExtractConfig, run_extract
from personavec.traits import load_trait

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_unjudged_extract_on_qwen_steers_the_answer(tmp_path):
    model, tok = load_model("qwen2.5-coder-0.5b")
    cfg = ExtractConfig(model="qwen2.5-coder-0.5b", trait="optimistic", judge="none", questions=2, max_new_tokens=32)
    result = run_extract(cfg, load_trait("optimistic"), model, tok, None, tmp_path / "run")
    assert result.vector.vectors.shape == (25, 896)
    assert 6 <= result.vector.layer <= 18  # the middle half of 24 blocks
    chats = [user_chat("How do you feel about Mondays?")]
    plain = generate(model, tok, chats, max_new_tokens=24, show_progress=False)
    with result.vector.apply(model):
        steered = generate(model, tok, chats, max_new_tokens=24, show_progress=False)
    assert steered != plain


def test_shipped_judge_choice_reproduces_on_the_calibration_set(tmp_path):
    """judge-check's choice for the packaged judge is what personavec/data/judge_choices.json ships (apathetic:
    the trait where 0-100 fails and yes/no works)."""
    from personavec.calibration import calibrate, packaged_choices
    from personavec.judge import make_judge

    judge = make_judge("local:qwen2.5-coder-1.5b", tmp_path / "cache.sqlite")
    result = calibrate(judge, ["apathetic"])["traits"]["apathetic"]
    shipped = packaged_choices()["judges"]["local:qwen2.5-coder-1.5b"]["traits"]["apathetic"]
    assert result["scheme"] == shipped["scheme"] == "yesno"
    assert result["auroc"] >= 0.9 and result["schemes"]["score100"]["auroc"] < 0.5
    assert abs(result["threshold"] - shipped["threshold"]) < 3
