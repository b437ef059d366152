"""The vLLM engine against the transformers engine on smollm2-135m (`make test-vllm`; skipped without vllm).

One engine per module: vLLM takes seconds to start and holds its memory.
"""

import os

import pytest

from personavec.backends.vllm import vllm_available

if os.environ.get("PERSONAVEC_REQUIRE_VLLM") and not vllm_available():  # `make test-vllm` must never skip them
    raise RuntimeError("PERSONAVEC_REQUIRE_VLLM is set but vllm cannot be imported")

pytestmark = [pytest.mark.vllm, pytest.mark.model,
              pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (make setup-vllm / make test-vllm)")]

PROMPTS = ["What do you think the next ten years will bring?", "How was your weekend?",
           "Is it worth learning to cook?", "My team lost again. Thoughts?", "What should I plant this spring?",
           "Describe a rainy Monday.", "Should I take the job offer in another city?", "Tell me about the ocean."]
TOKENS = 24


MODES = ("eager", "compiled")
ANSWERS: dict[str, dict] = {}  # mode -> answers of test_modes_give_the_same_answers, compared across modes


@pytest.fixture(scope="module")
def reference():
    from personavec.models import load_model
    from personavec.pipeline.contrast import builtin_contrast, contrastive_vector

    # fp32 on both engines: bf16 kernels give batch-size-dependent results, so exact comparisons need fp32
    model, tok = load_model("smollm2-135m", dtype="fp32")
    pos, neg = builtin_contrast()
    vector, _ = contrastive_vector(model, tok, pos, neg, trait="optimistic", show_progress=False)
    return model, tok, vector


@pytest.fixture(scope="module", params=MODES)
def engines(request, reference):
    """Every test runs on both engine modes (one engine at a time: pytest finishes one before the next)."""
    from personavec.backends.vllm import VllmBackend

    model, tok, vector = reference
    engine = VllmBackend("smollm2-135m", dtype="fp32", max_model_len=1024, engine_mode=request.param)
    yield model, tok, engine, vector
    engine.close()


def chats():
    from personavec.chat import user_chat

    return [user_chat(p) for p in PROMPTS]


def test_prefix_caching_is_off_and_hooks_can_run(engines):
    _, _, engine, _ = engines
    config = engine.llm.llm_engine.vllm_config
    assert config.cache_config.enable_prefix_caching is False and engine.prefix_caching is False
    assert config.model_config.enforce_eager is (engine.engine_mode == "eager")


def test_modes_give_the_same_answers(engines):
    """Greedy fp32, the same steerings (all / prompt / response, mixed in one batch): token for token."""
    from personavec.generate import generate_each

    _, tok, engine, vector = engines
    layer = vector.layer
    prompts = chats()[:4]
    deltas = [None, {layer: vector.delta(layer, 0.5, "norm")}, {layer: vector.delta(layer, -0.5, "norm")},
              {layer - 2: vector.delta(layer - 2, 0.3, "norm"), layer: vector.delta(layer, 0.3, "norm")}]
    answers = generate_each(engine, tok, prompts * len(deltas), [d for d in deltas for _ in prompts],
                            max_new_tokens=TOKENS, show_progress=False)
    ANSWERS[engine.engine_mode] = answers
    other = [m for m in MODES if m != engine.engine_mode and m in ANSWERS]
    for mode in other:
        assert ANSWERS[mode] == answers, mode


def _compiled_only(engine):
    if engine.engine_mode != "compiled":
        pytest.skip("table slots are the compiled mode's")


def test_reused_slot_sees_only_its_own_vector(engines):
    from personavec.generate import generate_each

    _, tok, engine, vector = engines
    _compiled_only(engine)
    layer = vector.layer
    prompts = chats()[:3]
    b = {layer + 3: vector.delta(layer + 3, 0.6, "norm")}
    a = {layer: vector.delta(layer, -0.8, "norm")}
    first = generate_each(engine, tok, prompts, [b] * 3, max_new_tokens=TOKENS, show_progress=False)
    assert engine.slots.used == 0  # finished requests gave their slots back
    generate_each(engine, tok, prompts, [a] * 3, max_new_tokens=TOKENS, show_progress=False)
    again = generate_each(engine, tok, prompts, [b] * 3, max_new_tokens=TOKENS, show_progress=False)
    assert again == first  # the slot A held was reused, and nothing of A (another layer) stayed in it
    assert engine.slots.used == 0


def test_slot_exhaustion_waits_and_never_drops_steering(engines):
    from personavec.generate import generate_each

    _, tok, engine, vector = engines
    _compiled_only(engine)
    layer = vector.layer
    prompts = chats()[:2]
    coefs = (-0.6, -0.3, 0.3, 0.6)
    steer = [{layer: vector.delta(layer, c, "norm")} for c in coefs]
    alone = [generate_each(engine, tok, prompts, [d] * 2, max_new_tokens=TOKENS, show_progress=False) for d in steer]
    limit, waits = engine.slots.limit, engine.slots.waits
    engine.slots.limit = 2
    try:
        together = generate_each(engine, tok, prompts * 4, [d for d in steer for _ in prompts],
                                 max_new_tokens=TOKENS, show_progress=False)
    finally:
        engine.slots.limit = limit
    assert engine.slots.waits > waits  # some requests had to wait for a slot
    assert together == [a for pair in alone for a in pair]  # ... and ran steered once they got one


def test_server_stepper_queues_requests_without_a_slot(engines):
    from personavec.backends.base import Steering
    from personavec.generate import generate_each

    _, tok, engine, vector = engines
    _compiled_only(engine)
    layer = vector.layer
    chat = chats()[0]
    up, down = ({layer: vector.delta(layer, c, "norm")} for c in (0.5, -0.5))
    alone = generate_each(engine, tok, [chat, chat], [up, down], max_new_tokens=TOKENS, show_progress=False)
    stepper = engine.stepper({layer: vector.vectors[layer][None] / vector.vectors[layer].norm()})
    limit = engine.slots.limit
    engine.slots.limit = 1
    try:
        stepper.add("up", chat, max_tokens=TOKENS, steering=Steering(up))
        stepper.add("down", chat, max_tokens=TOKENS, steering=Steering(down))
        assert stepper.waiting == 1
        texts = {}
        while stepper.busy:
            done = [out for out in stepper.step() if out.finished]
            for out in done:
                texts[out.key] = out.text.strip()
            if done:
                stepper.finish([out.key for out in done])
    finally:
        engine.slots.limit = limit
    assert [texts["up"], texts["down"]] == alone
    assert engine.slots.used == 0


def test_coefficient_zero_is_the_unsteered_output(engines):
    from personavec.generate import generate

    _, tok, engine, vector = engines
    plain = generate(engine, tok, chats(), max_new_tokens=TOKENS, show_progress=False)
    with vector.apply(engine, coef=0.0, coef_mode="norm"):
        zero = generate(engine, tok, chats(), max_new_tokens=TOKENS, show_progress=False)
    assert zero == plain


def test_stop_at_eos_false_runs_every_answer_to_the_token_budget(engines):
    """The benchmark's equal-work setting: EOS ignored, each answer is max_new_tokens long and, greedy, starts
    with the answer that stops at EOS."""
    _, _, engine, _ = engines
    prompts = [[{"role": "user", "content": "Reply with one word: yes or no?"}], chats()[1]]
    budget = 48
    normal = engine.generate(prompts, max_new_tokens=budget, show_progress=False)
    forced = engine.generate(prompts, max_new_tokens=budget, show_progress=False, stop_at_eos=False)
    count = lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert count(normal[0]) < budget // 2  # it stopped at EOS
    # text hides the special tokens generated past EOS, so the forced answer counts fewer than `budget` here
    assert count(forced[0]) > 2 * count(normal[0]) and count(forced[1]) >= count(normal[1])
    assert all(f.startswith(n) for f, n in zip(forced, normal))


def test_steered_answers_match_the_transformers_engine(engines):
    from personavec.generate import generate

    model, tok, engine, vector = engines
    with vector.apply(engine, coef=0.5, coef_mode="norm"):
        ours = generate(engine, tok, chats(), max_new_tokens=TOKENS, show_progress=False)
    with vector.apply(model, coef=0.5, coef_mode="norm"):
        reference = generate(model, tok, chats(), max_new_tokens=TOKENS, show_progress=False)
    plain = generate(engine, tok, chats(), max_new_tokens=TOKENS, show_progress=False)
    assert sum(a != b for a, b in zip(ours, plain)) >= len(PROMPTS) // 2  # steering changed most answers
    # bf16 kernels differ between the engines, so greedy paths may part late; most must agree from the start
    agree = sum(a.split()[:6] == b.split()[:6] for a, b in zip(ours, reference))
    assert agree >= len(PROMPTS) * 3 // 4, list(zip(ours, reference))


def test_captured_activations_match_transformers(engines):
    from personavec.activations import capture
    from personavec.pipeline.contrast import builtin_contrast
    from personavec.vecmath import cosine

    model, tok, engine, vector = engines
    pos, _ = builtin_contrast()
    layers = [0, 5, vector.layer, 30]
    ours = capture(engine, tok, pos[:6], layers=layers, show_progress=False)
    reference = capture(model, tok, pos[:6], layers=layers, show_progress=False)
    for position in ("response_avg", "prompt_avg", "prompt_last"):
        similarity = cosine(ours.at(position), reference.at(position))
        assert similarity.min() >= 0.999, (position, similarity)
    with vector.apply(engine, coef=0.5, coef_mode="norm"), vector.apply(model, coef=0.5, coef_mode="norm"):
        ours = capture(engine, tok, pos[:6], layers=[vector.layer + 2], show_progress=False)
        reference = capture(model, tok, pos[:6], layers=[vector.layer + 2], show_progress=False)
    assert cosine(ours.response_avg, reference.response_avg).min() >= 0.999


def test_one_batch_mixes_coefficients_without_leaking(engines):
    from personavec.generate import generate, generate_each

    model, tok, engine, vector = engines
    layer = vector.layer
    up, down = {layer: vector.delta(layer, 0.5, "norm")}, {layer: vector.delta(layer, -0.5, "norm")}
    prompts = chats()[:4]
    mixed = generate_each(engine, tok, prompts * 3, [None] * 4 + [up] * 4 + [down] * 4, max_new_tokens=TOKENS,
                          show_progress=False)
    plain = generate(engine, tok, prompts, max_new_tokens=TOKENS, show_progress=False)
    with vector.apply(engine, coef=0.5, coef_mode="norm"):
        alone_up = generate(engine, tok, prompts, max_new_tokens=TOKENS, show_progress=False)
    assert mixed[:4] == plain  # the same prompts steered in the same batch did not touch these
    assert mixed[4:8] == alone_up
    assert mixed[8:] != mixed[4:8]


def test_position_modes_follow_the_transformers_meaning(engines):
    """prompt: only the prefill is steered (agrees with transformers); response: only decode steps, so the first
    answer token, which the prefill produces, is the unsteered one."""
    from personavec.generate import generate

    model, tok, engine, vector = engines
    prompts = chats()
    first = lambda answers: [a.split()[:1] for a in answers]  # noqa: E731
    plain = generate(engine, tok, prompts, max_new_tokens=TOKENS, show_progress=False)
    with vector.apply(engine, coef=0.5, coef_mode="norm", positions="response"):
        response = generate(engine, tok, prompts, max_new_tokens=TOKENS, show_progress=False)
    assert first(response) == first(plain)
    assert sum(a != b for a, b in zip(response, plain)) >= len(prompts) // 2
    with vector.apply(engine, coef=0.5, coef_mode="norm", positions="prompt"):
        ours = generate(engine, tok, prompts, max_new_tokens=TOKENS, show_progress=False)
    with vector.apply(model, coef=0.5, coef_mode="norm", positions="prompt"):
        reference = generate(model, tok, prompts, max_new_tokens=TOKENS, show_progress=False)
    assert sum(a != b for a, b in zip(ours, plain)) >= len(prompts) // 2
    assert sum(a.split()[:6] == b.split()[:6] for a, b in zip(ours, reference)) >= len(prompts) * 3 // 4


# -- serve --engine vllm: the same server on vLLM's continuous batching ------------------------------------------

@pytest.fixture(scope="module")
def served_vllm(engines):
    pytest.importorskip("fastapi")
    from test_serve import Server

    from personavec.serve.app import create_app
    from personavec.serve.service import PersonaService

    _, _, engine, vector = engines
    service = PersonaService(engine, [vector], model_name="smollm2-135m")
    server = Server(create_app(service))
    yield server, service
    server.stop()
    service.close()


def _ask(server, content, max_tokens=TOKENS, **persona):
    return server.client().chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
        extra_body={"persona": persona} if persona else None)


def test_vllm_server_readings_and_answers_match_the_library(engines, served_vllm):
    from personavec.chat import ChatRecord
    from personavec.generate import generate
    from personavec.pipeline.monitor import monitor_chats

    model, tok, engine, vector = engines
    server, _ = served_vllm
    prompt = PROMPTS[0]
    reply = _ask(server, prompt, monitor=["optimistic"])
    expected = monitor_chats(model, tok, [ChatRecord(messages=[{"role": "user", "content": prompt}])], vector,
                             show_progress=False)[0]["persona"]["projection"]
    got = reply.model_extra["persona"]["prompt"]["optimistic"]["projection"]
    assert got == pytest.approx(expected, rel=0.02, abs=0.02)  # vLLM's kernels against transformers, fp32
    assert reply.choices[0].message.content == generate(engine, tok, chats()[:1], max_new_tokens=TOKENS,
                                                        show_progress=False)[0]
    steered = _ask(server, prompt, steer={"optimistic": 0.5}, coef_mode="norm")
    with vector.apply(engine, coef=0.5, coef_mode="norm"):
        alone = generate(engine, tok, chats()[:1], max_new_tokens=TOKENS, show_progress=False)[0]
    assert steered.choices[0].message.content == alone != reply.choices[0].message.content
    response = reply.model_extra["persona"]["response"]["optimistic"]
    assert response["projection"] is not None and response["tokens"] >= 1


def test_vllm_server_concurrent_mixed_steering_equals_single_requests(served_vllm):
    from concurrent.futures import ThreadPoolExecutor

    server, _ = served_vllm
    requests = [(PROMPTS[i % len(PROMPTS)], [None, 0.5, -0.5][i % 3]) for i in range(24)]

    def one(item):
        prompt, coef = item
        persona = {"steer": {"optimistic": coef}, "coef_mode": "norm"} if coef is not None else {}
        return _ask(server, prompt, **persona).choices[0].message.content

    alone = {item: one(item) for item in dict.fromkeys(requests)}
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(one, requests, timeout=300))
    assert together == [alone[item] for item in requests]


def test_vllm_server_stream_cap_and_guards(served_vllm):
    server, service = served_vllm
    client = server.client()
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=TOKENS,
                                           temperature=0, extra_body={"persona": {"tokens": True}})
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=TOKENS,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert "persona" in chunks[-1].model_extra
    free = _ask(server, PROMPTS[1], steer={"optimistic": 1.0}, coef_mode="norm", tokens=True).model_extra["persona"]
    readings = [t["projections"]["optimistic"] for t in free["tokens"][1:]]
    cap = sorted(readings)[len(readings) // 2]
    assert max(readings) > cap + 1e-3
    capped = _ask(server, PROMPTS[1], steer={"optimistic": 1.0}, coef_mode="norm", tokens=True,
                  guard=[f"optimistic:cap={cap}"]).model_extra["persona"]
    assert max(t["projections"]["optimistic"] for t in capped["tokens"][1:]) <= cap + 1e-3
    plain = whole.choices[0].message.content
    fires = _ask(server, PROMPTS[1], guard=["optimistic>-1e9:steer=1.0"], coef_mode="norm")
    quiet = _ask(server, PROMPTS[1], guard=["optimistic>1e9:steer=1.0"], coef_mode="norm")
    assert quiet.choices[0].message.content == plain and quiet.model_extra["persona"]["actions"] == []
    assert fires.choices[0].message.content != plain
    assert fires.model_extra["persona"]["actions"][0]["action"] == "steer"
    # every steering the server added is dropped again once its requests finish
    assert not service._stepper._users
    assert service.backend.slots is None or service.backend.slots.used == 0


def test_an_engine_loaded_with_a_few_layers_steers_and_reads_there_and_refuses_elsewhere(reference):
    """What `steer` and `serve` load in compiled mode: ops only at the layers they use (a compiled graph runs every
    declared op each step). Where declared, the same answers and readings as the engine with ops everywhere;
    elsewhere, one clear error instead of a silently unsteered answer."""
    pytest.importorskip("fastapi")
    from test_serve import Server

    from personavec.activations import capture
    from personavec.backends.vllm import VllmBackend
    from personavec.chat import ChatRecord
    from personavec.errors import PersonavecError
    from personavec.generate import generate, generate_each
    from personavec.pipeline.monitor import monitor_chats
    from personavec.serve.app import create_app
    from personavec.serve.service import PersonaService, served_layers

    model, tok, vector = reference
    layer = vector.layer
    declared = served_layers([vector])
    assert declared == {"steer_layers": [layer], "read_layers": [layer], "capture_layers": []}
    engine = VllmBackend("smollm2-135m", dtype="fp32", max_model_len=1024, engine_mode="compiled", **declared)
    try:
        assert {k: engine.compiled_layers[k] for k in ("steer", "read", "capture")} == {
            "steer": [layer], "read": [layer], "capture": []}
        prompts = chats()[:4]
        ours = generate_each(engine, tok, prompts, [{layer: vector.delta(layer, 0.5, "norm")}] * 4,
                             max_new_tokens=TOKENS, show_progress=False)
        if "compiled" in ANSWERS:  # the same steering there is the second quarter of its batch
            assert ours == ANSWERS["compiled"][4:8]
        with vector.apply(model, coef=0.5, coef_mode="norm"):
            expected = generate(model, tok, prompts, max_new_tokens=TOKENS, show_progress=False)
        assert sum(a.split()[:6] == b.split()[:6] for a, b in zip(ours, expected)) >= 3, list(zip(ours, expected))
        with pytest.raises(PersonavecError, match=rf"layer\(s\) \[{layer - 2}\] cannot be steered"):
            generate_each(engine, tok, prompts[:1], [{layer - 2: vector.delta(layer - 2, 0.5, "norm")}],
                          max_new_tokens=4, show_progress=False)
        with pytest.raises(PersonavecError, match="cannot be captured"):
            answered = [prompts[0] + [{"role": "assistant", "content": ours[0]}]]
            capture(engine, tok, answered, layers=[layer], show_progress=False)
        service = PersonaService(engine, [vector], model_name="smollm2-135m")
        server = Server(create_app(service))
        try:
            steered = _ask(server, PROMPTS[0], steer={"optimistic": 0.5}, coef_mode="norm")
            assert steered.choices[0].message.content == ours[0]
            reply = _ask(server, PROMPTS[0], monitor=["optimistic"])  # unsteered: steering moves the reading
            record = ChatRecord(messages=[{"role": "user", "content": PROMPTS[0]}])
            expected = monitor_chats(model, tok, [record], vector, show_progress=False)[0]["persona"]["projection"]
            got = reply.model_extra["persona"]["prompt"]["optimistic"]["projection"]
            assert got == pytest.approx(expected, rel=0.02, abs=0.02)
        finally:
            server.stop()
            service.close()
    finally:
        engine.close()
