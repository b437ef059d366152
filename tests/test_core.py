"""Core numerics on tiny random models, each checked against an independent computation."""

import json

import pytest
import torch
from conftest import CHATS

from personavec.activations import capture
from personavec.chat import encode_chat
from personavec.errors import PersonavecError
from personavec.models import decoder_blocks
from personavec.steering import add_vectors, steer
from personavec.vectors import PersonaVector


def reference(model, tok, messages):
    """hidden_states of one unpadded chat: [n_layers + 1, seq, hidden], plus its prompt length."""
    enc = encode_chat(tok, messages)
    with torch.no_grad():
        out = model(torch.tensor([enc.input_ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0], enc.prompt_len


def test_capture_matches_output_hidden_states(tiny):
    model, tok = tiny
    acts = capture(model, tok, CHATS, batch_size=3, show_progress=False)
    assert acts.layers == list(range(len(decoder_blocks(model)) + 1))
    for i, chat in enumerate(CHATS):
        hs, plen = reference(model, tok, chat)
        torch.testing.assert_close(acts.response_avg[i], hs[:, plen:].mean(1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(acts.prompt_avg[i], hs[:, :plen].mean(1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(acts.prompt_last[i], hs[:, plen - 1], atol=1e-5, rtol=1e-4)


def test_padding_does_not_leak(tiny):
    model, tok = tiny
    alone = capture(model, tok, CHATS[:1], show_progress=False)
    batched = capture(model, tok, CHATS, batch_size=8, show_progress=False)
    torch.testing.assert_close(alone.response_avg[0], batched.response_avg[0], atol=1e-5, rtol=1e-4)


def test_early_exit_runs_only_needed_blocks_and_never_the_lm_head(tiny):
    model, tok = tiny
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(decoder_blocks(model))]
    hooks.append(model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    try:
        acts = capture(model, tok, CHATS, layers=[1], show_progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]
    full = capture(model, tok, CHATS, show_progress=False)
    torch.testing.assert_close(acts.response_avg[:, 0], full.response_avg[:, 1])


def test_capture_rejects_layer_out_of_range(tiny):
    model, tok = tiny
    with pytest.raises(PersonavecError, match="layer=9 is out of range"):
        capture(model, tok, CHATS, layers=[9], show_progress=False)


def test_response_span_excludes_end_of_turn(tiny):
    _, tok = tiny
    enc = encode_chat(tok, CHATS[0])
    assert tok.decode(enc.input_ids[enc.prompt_len:]).replace(" ", "") == "hellofriend,niceday"
    assert "<|end|>" not in tok.decode(enc.input_ids[enc.prompt_len:])


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_steering_changes_exactly_hidden_states_at_layer(tiny, layer):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, CHATS[0]).input_ids])
    v = torch.randn(64)
    with torch.no_grad():
        base = model(ids, output_hidden_states=True).hidden_states
        with steer(model, v, layer, 2.0):
            steered = model(ids, output_hidden_states=True).hidden_states
    if layer > 0:
        torch.testing.assert_close(steered[layer - 1], base[layer - 1])
    last = len(base) - 1
    if layer < last:
        torch.testing.assert_close(steered[layer], base[layer] + 2.0 * v, atol=1e-5, rtol=1e-5)
    else:  # transformers reports the last layer after the final norm
        norm = model.model.norm
        raw = {}
        h = decoder_blocks(model)[-1].register_forward_hook(lambda m, a, o: raw.setdefault("x", o))
        with torch.no_grad():
            model(ids)
        h.remove()
        torch.testing.assert_close(steered[layer], norm(raw["x"] + 2.0 * v), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(steered[layer], base[layer])


def test_steering_is_removed_after_exception_and_composes(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, CHATS[0]).input_ids])
    with torch.no_grad():
        base = model(ids, output_hidden_states=True).hidden_states[1]
    a, b = torch.randn(64), torch.randn(64)
    with pytest.raises(RuntimeError):
        with steer(model, a, 1, 1.0):
            raise RuntimeError("boom")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, output_hidden_states=True).hidden_states[1], base)
        with steer(model, a, 1, 1.0), steer(model, b, 1, 1.0):
            both = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(both, base + a + b, atol=1e-5, rtol=1e-5)


def test_steering_positions_during_generation(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, CHATS[0], with_response=False).input_ids])
    v = torch.randn(64) * 20

    def gen(positions=None):
        if positions is None:
            return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        with steer(model, v, 2, 1.0, positions=positions):
            return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]

    plain, all_, prompt, response = gen(), gen("all"), gen("prompt"), gen("response")
    assert not torch.equal(plain, all_)
    assert prompt[0] == all_[0]  # the first token comes from the (steered) prefill
    assert response[0] == plain[0]  # the prefill is untouched in response mode
    assert not torch.equal(response, plain)


def test_steering_left_padding_is_not_steered(tiny):
    model, tok = tiny
    v = torch.randn(64) * 5
    seen = {}
    hook = decoder_blocks(model)[0].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    batch = tok(["<|user|>a<|end|><|assistant|>", "<|user|>a much longer one<|end|><|assistant|>"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**batch)
        base = seen.pop("h")
        with steer(model, v, 1, 1.0):
            # the hook above sees the block output before our hook adds; read it from hidden_states instead
            steered = model(**batch, output_hidden_states=True).hidden_states[1]
    hook.remove()
    pad = batch["attention_mask"] == 0
    torch.testing.assert_close(steered[pad], base[pad])
    torch.testing.assert_close(steered[~pad], base[~pad] + v, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_steering(tiny):
    model, tok = tiny
    ids = torch.tensor([encode_chat(tok, CHATS[0]).input_ids])
    v = torch.randn(64)
    with steer(model, v, 2, 1.0):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grad = decoder_blocks(model)[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()
    plain = model(ids, labels=ids).loss
    assert not torch.isclose(plain, loss)


def test_steering_rejects_bad_vectors(tiny):
    model, _ = tiny
    with pytest.raises(PersonavecError, match="out of range"):
        add_vectors(model, {7: torch.zeros(64)})
    with pytest.raises(PersonavecError, match="NaN or inf"):
        add_vectors(model, {1: torch.full((64,), float("nan"))})


def test_vector_from_activations_is_mean_difference(tiny):
    model, tok = tiny
    pos = capture(model, tok, CHATS[:2], show_progress=False)
    neg = capture(model, tok, CHATS[2:], show_progress=False)
    vec = PersonaVector.from_activations(pos, neg, model=model, trait="t")
    torch.testing.assert_close(vec.vectors, pos.response_avg.mean(0) - neg.response_avg.mean(0))
    torch.testing.assert_close(vec.prompt_last, pos.prompt_last.mean(0) - neg.prompt_last.mean(0))
    assert (vec.n_pos, vec.n_neg) == (2, 1) and vec.vectors.shape == (4, 64)
    # norm-relative coefficient: the added vector is coef times the mean response-token norm long
    delta = vec.delta(2, 0.5, "norm")
    assert torch.isclose(delta.norm(), 0.5 * vec.norms[2], rtol=1e-5)


def test_relative_norms_are_mean_token_norms(tiny):
    model, tok = tiny
    acts = capture(model, tok, CHATS[:1], show_progress=False)
    hs, plen = reference(model, tok, CHATS[0])
    torch.testing.assert_close(acts.token_norm[0], hs[:, plen:].norm(dim=-1).mean(1), atol=1e-4, rtol=1e-4)


def test_vector_check_model_refuses_other_shapes(tiny):
    model, _ = tiny
    vec = PersonaVector(vectors=torch.randn(4, 32), source="v.safetensors")
    with pytest.raises(PersonavecError, match="v.safetensors: made for a model with 3 layers and hidden size 32"):
        vec.check_model(model)
    vec = PersonaVector(vectors=torch.randn(9, 64), source="v.safetensors")
    with pytest.raises(PersonavecError, match="8 layers"):
        vec.apply(model, layer=1, coef=1.0)


def test_capture_json_roundtrip_fields_are_floats(tiny, tmp_path):
    model, tok = tiny
    pos = capture(model, tok, CHATS[:2], show_progress=False)
    neg = capture(model, tok, CHATS[2:], show_progress=False)
    vec = PersonaVector.from_activations(pos, neg, model=model, trait="t", layer=2, coef=1.5)
    vec.save(tmp_path / "v.safetensors")
    loaded = PersonaVector.load(tmp_path / "v.safetensors")
    assert json.loads(json.dumps(loaded.counts)) == {}
    assert (loaded.layer, loaded.coef, loaded.trait, loaded.n_pos) == (2, 1.5, "t", 2)


def test_projection_stats_and_the_0_to_1_scale_by_hand(tmp_path):
    """pos_mean maps to exactly 1 and neg_mean to exactly 0; the stats are the projections' mean and sd."""
    from personavec.activations import Activations
    from personavec.vecmath import scale01

    pos = torch.tensor([[[2.0, 0.0]], [[4.0, 0.0]]])  # 2 chats, 1 layer, hidden 2
    neg = torch.tensor([[[0.0, 1.0]], [[0.0, 3.0]]])
    vector = PersonaVector.from_activations(Activations(layers=[0], response_avg=pos), Activations(layers=[0], response_avg=neg),
                                            trait="t")
    # v = (3, -2), unit u = (3, -2)/sqrt(13): pos projections 6/sqrt13, 12/sqrt13; neg -2/sqrt13, -6/sqrt13
    r13 = 13 ** 0.5
    expected = torch.tensor([[9 / r13, (18 / 13) ** 0.5, -4 / r13, (8 / 13) ** 0.5]])
    torch.testing.assert_close(vector.projection_stats, expected)
    vector.layer = 0
    assert vector.scaled(9 / r13) == pytest.approx(1.0, abs=1e-6) and vector.scaled(-4 / r13) == pytest.approx(0.0, abs=1e-6)
    assert scale01(3.0, 1.0, 5.0) == 0.5
    vector.save(tmp_path / "v.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert float(meta["pos_mean"]) == pytest.approx(9 / r13) and float(meta["neg_sd"]) == pytest.approx((8 / 13) ** 0.5)
    again = PersonaVector.load(tmp_path / "v.safetensors")
    assert again.scaled(9 / r13) == pytest.approx(1.0, abs=1e-6)


def test_bootstrap_intervals_by_hand():
    from personavec.vecmath import bootstrap_mean_ci, paired_difference_ci

    constant = torch.full((10,), 3.0)
    assert bootstrap_mean_ci(constant) == (3.0, 3.0)
    low, high = bootstrap_mean_ci(torch.arange(100.0))
    assert low < 49.5 < high and high - low < 20
    mean, low, high = paired_difference_ci(torch.arange(10.0), torch.arange(10.0) + 2)
    assert (mean, low, high) == (2.0, 2.0, 2.0)
    mean, low, high = paired_difference_ci(torch.arange(10.0), torch.arange(10.0))
    assert mean == 0.0 and low <= 0.0 <= high
