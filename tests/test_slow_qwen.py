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
