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
