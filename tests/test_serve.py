"""`personavec serve` on 127.0.0.1, called with the official openai client, on smollm2-135m in fp32."""

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (raw HTTP for malformed bodies and streams cut short)

from personavec.chat import user_chat  # noqa: E402
from personavec.serve.guards import Guard, parse_guard  # noqa: E402
from personavec.errors import PersonavecError  # noqa: E402

pytestmark = pytest.mark.model
MODEL = "smollm2-135m"
TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, poll: float, name: str, exited=lambda: False) -> None:
    """Return once `url/health` answers 200; fail after `timeout` seconds, or at once when `exited()` says so."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(poll)
        if exited():
            raise RuntimeError(f"{name} exited")
    raise RuntimeError(f"{name} did not start")


class Server:
    """A real uvicorn server in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url, 30, 0.05, "server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key="none"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from personavec.backends import load_backend
    from personavec.pipeline.contrast import builtin_contrast, contrastive_vector
    from personavec.serve.app import RequestLog, create_app
    from personavec.serve.service import PersonaService

    folder = tmp_path_factory.mktemp("serve")
    backend = load_backend(MODEL, dtype="fp32")
    pos, neg = builtin_contrast()
    vector, _ = contrastive_vector(backend, backend.tokenizer, pos, neg, trait="optimistic", show_progress=False)
    vector.model = MODEL
    vector_path = folder / "optimistic.safetensors"
    vector.save(vector_path)
    service = PersonaService(backend, [vector], model_name=MODEL, batch_window_s=0.05)
    log_path = folder / "requests.jsonl"
    server = Server(create_app(service, log=RequestLog(log_path)))
    keyed = Server(create_app(service, api_key="s3cret"))
    yield {"server": server, "keyed": keyed, "service": service, "backend": backend, "vector": vector,
           "vector_path": vector_path, "log": log_path, "folder": folder}
    server.stop()
    keyed.stop()
    service.close()


def ask(client, content, system=None, **persona):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0,
                                          extra_body={"persona": persona} if persona else None)


def test_readings_equal_monitor_and_unsteered_equals_steer_coef_0(served, capsys):
    from test_cli import run_cli

    from personavec.chat import ChatRecord
    from personavec.pipeline.monitor import monitor_chats

    client = served["server"].client()
    reply = ask(client, "How was your weekend?", monitor=["optimistic"])
    persona = reply.model_extra["persona"]
    backend, vector = served["backend"], served["vector"]
    expected = monitor_chats(backend, backend.tokenizer, [ChatRecord(messages=[user_chat("How was your weekend?")][0])],
                             vector, show_progress=False)[0]["persona"]["projection"]
    got = persona["prompt"]["optimistic"]["projection"]
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert persona["response"]["optimistic"]["projection"] is not None
    assert 0 < reply.usage.completion_tokens <= TOKENS and reply.usage.prompt_tokens > 0
    code, out, err = run_cli(capsys, "steer", "--model", MODEL, "--vector", served["vector_path"], "--coef", "0",
                             "--prompt", "How was your weekend?", "--max-new-tokens", TOKENS, "--dtype", "fp32")
    assert code == 0, err
    assert reply.choices[0].message.content == out.strip()


def test_steered_request_differs_and_equals_library_steering(served):
    from personavec.generate import generate

    client = served["server"].client()
    backend, vector = served["backend"], served["vector"]
    plain = ask(client, "Describe a rainy Monday.").choices[0].message.content
    steered = ask(client, "Describe a rainy Monday.", steer={"optimistic": 8.0}, coef_mode="raw")
    assert steered.choices[0].message.content != plain
    assert steered.model_extra["persona"]["steer"] == {"optimistic": 8.0}
    with vector.apply(backend, coef=8.0, coef_mode="raw"):
        expected = generate(backend, backend.tokenizer, [user_chat("Describe a rainy Monday.")],
                            max_new_tokens=TOKENS, show_progress=False)[0]
    assert steered.choices[0].message.content == expected


def test_stream_carries_the_same_text_and_persona(served):
    client = served["server"].client()
    messages = [{"role": "user", "content": "Tell me about the ocean."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0,
                                           extra_body={"persona": {"monitor": ["optimistic"], "tokens": True}})
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0,
                                                 stream=True, extra_body={"persona": {"monitor": ["optimistic"]}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    carrying = [c for c in chunks if "persona" in (c.model_extra or {})]
    assert len(carrying) == 1 and carrying[0] is chunks[-1]
    streamed = carrying[0].model_extra["persona"]
    assert streamed["prompt"]["optimistic"]["projection"] == pytest.approx(
        whole.model_extra["persona"]["prompt"]["optimistic"]["projection"], abs=1e-5)
    tokens = whole.model_extra["persona"]["tokens"]
    assert len(tokens) == whole.usage.completion_tokens and "optimistic" in tokens[0]["projections"]


def test_32_concurrent_mixed_steering_requests_each_equal_their_single_answer(served):
    client = served["server"].client()
    questions = ["How was your day?", "What do you think of Mondays?", "Is the weather nice?", "Tell me a story.",
                 "What should I cook tonight?", "Describe your ideal city.", "How do I learn piano?", "Any advice?"]
    requests = [(questions[i % 8], [None, 6.0, -6.0][i % 3]) for i in range(32)]

    def one(item):
        question, coef = item
        persona = {"steer": {"optimistic": coef}, "coef_mode": "raw"} if coef is not None else {}
        return ask(client, question, **persona).choices[0].message.content

    alone = {item: one(item) for item in dict.fromkeys(requests)}  # sequential: one request at a time
    started = time.time()
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(one, requests, timeout=300))
    assert time.time() - started < 300
    assert together == [alone[item] for item in requests]
    assert len(set(alone.values())) > len(questions)  # steering changed answers


def test_bad_requests_get_openai_errors_and_the_server_stays_up(served):
    server = served["server"]
    url = f"{server.url}/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
        (dict(json={"model": MODEL}), 400),
        (dict(json={**ok, "persona": {"monitor": ["nosuchtrait"]}}), 400),
        (dict(json={**ok, "persona": {"steer": {"nosuchtrait": 1.0}}}), 400),
        (dict(json={**ok, "max_tokens": -1}), 400),
        (dict(json={**ok, "max_tokens": 10 ** 9}), 400),
        (dict(json={**ok, "messages": [{"role": "user", "content": "word " * 9000}]}), 400),
        (dict(json={**ok, "model": "gpt-9"}), 404),
        (dict(json={**ok, "messages": "hi"}), 422),
        (dict(content=b"x" * (2 << 20), headers={"content-type": "application/json"}), 413),
    ]
    for kwargs, status in cases:
        response = httpx.post(url, timeout=30, **kwargs)
        assert response.status_code == status, (kwargs.get("json"), response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    over = httpx.post(url, json={**ok, "messages": [{"role": "user", "content": "word " * 9000}]})
    assert over.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        ask(server.client(), "hi", steer={"nosuchtrait": 1.0})
    keyed = served["keyed"]
    with pytest.raises(openai.AuthenticationError):
        ask(keyed.client("wrong"), "hi")
    assert ask(keyed.client("s3cret"), "hi").choices[0].message.content
    assert [m.id for m in keyed.client("s3cret").models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    assert httpx.get(f"{keyed.url}/api/requests?key=wrong").status_code == 401
    assert httpx.get(f"{server.url}/no/such/route").status_code == 404


def test_flag_guard_fires_on_an_eliciting_prompt_and_not_on_a_neutral_one(served):
    """Per question, the threshold is the midpoint of the readings under instruction pairs 0-1 of the trait file;
    the test prompts use the held-out pairs 2-4: the trait's pos instruction ("You are an optimistic assistant.
    ...") must be flagged and the neutral helpful-assistant one (its neg instruction) must not."""
    from personavec.traits import load_trait

    client = served["server"].client()
    trait = load_trait("optimistic")

    def request(question, pair, side, guard=None):
        system = (f"You are {trait.article} {trait.adjective} assistant. " if side == "pos"
                  else "You are a helpful assistant. ") + trait.instructions[pair][0 if side == "pos" else 1]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        persona = {"monitor": ["optimistic"], **({"guard": [guard]} if guard else {})}
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0,
                                              extra_body={"persona": persona}).model_extra["persona"]

    for question in trait.eval_questions[:3]:
        calibration = {side: [request(question, pair, side)["prompt"]["optimistic"]["projection"] for pair in (0, 1)]
                       for side in ("pos", "neg")}
        threshold = (sum(calibration["pos"]) / 2 + sum(calibration["neg"]) / 2) / 2
        rule = f"optimistic>{threshold}:flag"
        for pair in (2, 3, 4):
            elicit, neutral = request(question, pair, "pos", rule), request(question, pair, "neg", rule)
            assert elicit["prompt"]["optimistic"]["flagged"] is True, (question, pair, threshold, elicit["prompt"])
            assert neutral["prompt"]["optimistic"]["flagged"] is False, (question, pair, threshold, neutral["prompt"])
            assert [a["action"] for a in elicit["actions"]] == ["flag"] and neutral["actions"] == []
    metrics = httpx.get(f"{served['server'].url}/metrics").text
    assert 'personavec_flagged_total{trait="optimistic"}' in metrics and "personavec_request_latency_seconds" in metrics


def test_steer_guard_steers_only_when_it_fires(served):
    client = served["server"].client()
    plain = ask(client, "Describe a rainy Monday.").choices[0].message.content
    fires = ask(client, "Describe a rainy Monday.", guard=["optimistic>-1e9:steer=8"], coef_mode="raw")
    quiet = ask(client, "Describe a rainy Monday.", guard=["optimistic>1e9:steer=8"], coef_mode="raw")
    assert quiet.choices[0].message.content == plain and quiet.model_extra["persona"]["actions"] == []
    assert fires.choices[0].message.content != plain
    assert fires.model_extra["persona"]["actions"][0]["action"] == "steer"
    # the first answer token comes from the unsteered prefill: steering starts with the answer
    assert fires.choices[0].message.content.split()[0] == plain.split()[0]


def test_cap_holds_the_projection_at_or_below_the_cap(served):
    client = served["server"].client()
    kwargs = dict(steer={"optimistic": 8.0}, coef_mode="raw", tokens=True)
    free = ask(client, "Describe a rainy Monday.", **kwargs).model_extra["persona"]
    readings = [t["projections"]["optimistic"] for t in free["tokens"][1:]]  # [0] is the prompt state
    cap = sorted(readings)[len(readings) // 2]
    assert max(readings) > cap + 1e-3
    capped = ask(client, "Describe a rainy Monday.", guard=[f"optimistic:cap={cap}"], **kwargs).model_extra["persona"]
    after = [t["projections"]["optimistic"] for t in capped["tokens"][1:]]
    assert after and max(after) <= cap + 1e-3
    assert capped["response"]["optimistic"]["projection"] <= cap + 1e-3
    assert capped["actions"][0]["action"] == "cap"


def test_client_that_disconnects_mid_stream_frees_its_row(served):
    server, service = served["server"], served["service"]
    before = service.cancelled
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 3:
                break
    deadline = time.time() + 60
    while service.cancelled == before and time.time() < deadline:
        time.sleep(0.1)
    assert service.cancelled == before + 1
    assert ask(server.client(), "hi").choices[0].message.content  # the worker is free again


def test_log_has_readings_and_no_text_by_default(served):
    ask(served["server"].client(), "A secret question about gardening?")
    lines = [json.loads(line) for line in served["log"].read_text().splitlines()]
    assert lines and all("persona" in line and "prompt" in line["persona"] for line in lines)
    assert "gardening" not in served["log"].read_text()


def test_dashboard_shows_requests_in_headless_chromium(served):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (the CI setup installs Debian's chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    server = served["server"]
    ask(server.client(), "What colour is the dashboard sky?", tokens=True)
    profile = served["folder"] / "chromium-profile"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", f"{server.url}/"], capture_output=True, text=True, timeout=120).stdout
    assert "What colour is the dashboard sky?" in dom
    assert 'class="tok"' in dom and "recent requests" in dom
    shot = os.environ.get("PERSONAVEC_DASHBOARD_SCREENSHOT")
    if shot:
        subprocess.run(flags + ["--window-size=1200,1300", f"--screenshot={shot}", f"{server.url}/"],
                       capture_output=True, timeout=120)


def test_guard_rules_parse_and_refuse_nonsense():
    assert parse_guard("evil>2.5:flag") == Guard("evil", "flag", 2.5)
    assert parse_guard("evil > -1 : steer=-0.5") == Guard("evil", "steer", -1.0, -0.5)
    assert parse_guard("evil:cap=3") == Guard("evil", "cap", None, 3.0)
    assert str(parse_guard("evil>2.5:steer=-0.5")) == "evil>2.5:steer=-0.5"
    for bad in ("evil", "evil:flag", "evil>x:flag", "evil>1:cap=2", "evil:cap", "evil>1:steer", "evil>nan:flag",
                "evil>1:flag=3", "evil>1:explode"):
        with pytest.raises(PersonavecError, match="guard"):
            parse_guard(bad)


def test_service_refuses_vectors_it_cannot_serve(served):
    from personavec.serve.service import PersonaService

    backend, vector = served["backend"], served["vector"]
    unnamed = type(vector)(vectors=vector.vectors, layer=vector.layer)
    with pytest.raises(PersonavecError, match="records no trait name"):
        PersonaService(backend, [unnamed])
    no_layer = type(vector)(vectors=vector.vectors, trait="optimistic")
    with pytest.raises(PersonavecError, match="records no layer"):
        PersonaService(backend, [no_layer])
    with pytest.raises(PersonavecError, match="given twice"):
        PersonaService(backend, [vector, vector])
    with pytest.raises(PersonavecError, match="unknown trait 'evil'"):
        PersonaService(backend, [vector], [parse_guard("evil>1:flag")])
