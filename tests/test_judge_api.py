"""OpenAI-compatible judges against a real HTTP server on 127.0.0.1 (stdlib http.server in a thread).

The server plays a judge whose answer distribution is known exactly, in the
chat-completions shape with logprobs, and fails on purpose when told to.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

import pytest

from http_fake import serve_handler
from personavec.errors import PersonavecError
from personavec.judge import OpenAIJudge, make_judge

END = "<|im_end|>"
KEY = "sk-test-SECRET-0123456789abcdef"


class FakeLLM:
    """A judge that answers `answers` (text -> probability), tokenized as `mode` says.

    mode "split": one token per character (Qwen/SmolLM2-like); "whole": a number is one token
    (tiktoken-like). With `prefill`, a trailing assistant message is continued (vLLM's
    continue_final_message / llama.cpp); without it such a request is a 400.
    `plan` is a list of failures to serve, one per request, before normal answers:
    "429", "500", "slow" (sleep past the client timeout), "401" (echoes the key), "400".
    With `report_stop` the end-of-turn token gets its own logprobs entry (as vLLM reports it);
    without it, as OpenAI does, the position where the judge stopped is not reported.
    """

    def __init__(self, answers, mode="whole", prefill=True, plan=(), delay=0.0, top=20, report_stop=True):
        self.answers, self.mode, self.prefill, self.plan = answers, mode, prefill, list(plan)
        self.report_stop = report_stop
        self.delay, self.top = delay, top
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0
        self.fail_after: int | None = None  # every request after this many is a 400

    def tokens(self, text):
        if self.mode == "whole" and text.isdigit():
            return [text]
        return list(text)

    def next_dist(self, prefix):
        weights: dict[str, float] = {}
        for answer, p in self.answers.items():
            toks = self.tokens(answer)
            if toks[: len(prefix)] == prefix:
                nxt = toks[len(prefix)] if len(toks) > len(prefix) else END
                weights[nxt] = weights.get(nxt, 0.0) + p
        total = sum(weights.values()) or 1.0
        return {t: w / total for t, w in weights.items()} if weights else {END: 1.0}

    def complete(self, body):
        messages = body["messages"]
        prefix = []
        if messages[-1]["role"] == "assistant":
            prefix = self.tokens(messages[-1]["content"])
        entries, content = [], ""
        for _ in range(body.get("max_tokens") or 16):
            dist = self.next_dist(prefix)
            tops = sorted(dist.items(), key=lambda kv: -kv[1])[: body.get("top_logprobs") or 0]
            token = max(dist, key=lambda t: dist[t])
            if token != END or self.report_stop:
                entries.append({"token": token, "logprob": math.log(dist[token]), "bytes": list(token.encode()),
                                "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
                                                 for t, p in tops]})
            if token == END:
                break
            content += token
            prefix = prefix + [token]
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": content},
                             "logprobs": {"content": entries}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(entries), "total_tokens": 1 + len(entries)}}


@contextmanager
def serve(llm: FakeLLM):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def reply(self, status, obj):
            data = json.dumps(obj).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with llm.lock:
                llm.requests.append(body)
                n = len(llm.requests)
                action = llm.plan.pop(0) if llm.plan else "ok"
                llm.inflight += 1
                llm.max_inflight = max(llm.max_inflight, llm.inflight)
            try:
                if llm.fail_after is not None and n > llm.fail_after:
                    action = "400"
                if llm.delay:
                    time.sleep(llm.delay)
                if action == "429":
                    return self.reply(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}})
                if action == "500":
                    return self.reply(500, {"error": {"message": "internal error", "type": "server_error"}})
                if action == "401":
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    return self.reply(401, {"error": {"message": f"Incorrect API key provided: {key}. "
                                                      f"You passed {key[:7]}***{key[-4:]}", "type": "auth"}})
                if action == "400":
                    return self.reply(400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
                if action == "slow":
                    time.sleep(1.5)
                if body["messages"][-1]["role"] == "assistant" and not llm.prefill:
                    return self.reply(400, {"error": {"message": "assistant prefill is not supported",
                                                      "type": "invalid_request_error"}})
                return self.reply(200, llm.complete(body))
            finally:
                with llm.lock:
                    llm.inflight -= 1

    with serve_handler(Handler) as url:
        yield url


def _judge(url, tmp_path, **kw):
    kw.setdefault("timeout", 5.0)
    kw.setdefault("max_retries", 3)
    return OpenAIJudge("fake-judge", tmp_path / "cache.sqlite", base_url=url, api_key=KEY, **kw)


DIST = {"85": 0.5, "90": 0.3, "7": 0.2}
EXACT = 0.5 * 85 + 0.3 * 90 + 0.2 * 7  # 70.9


def test_whole_number_tokens_one_request(tmp_path):
    llm = FakeLLM(DIST, mode="whole")
    with serve(llm) as url:
        judge = _judge(url, tmp_path)
        assert judge.score(["rate this"]) == [pytest.approx(EXACT)]
    assert len(llm.requests) == 1
    body = llm.requests[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0


def test_split_digits_follow_up_with_prefill_is_exact(tmp_path):
    llm = FakeLLM(DIST, mode="split", prefill=True)
    with serve(llm) as url:
        judge = _judge(url, tmp_path)
        assert judge.score(["rate this"]) == [pytest.approx(EXACT)]
    # greedy "85" (gives P(.|"8") for free) + one follow-up each for the leading digits "9" and "7"
    assert len(llm.requests) == 3
    follow = [b for b in llm.requests if b["messages"][-1]["role"] == "assistant"]
    assert sorted(b["messages"][-1]["content"] for b in follow) == ["7", "9"]
    assert all(b["continue_final_message"] is True and b["add_generation_prompt"] is False for b in follow)


def test_split_digits_100_and_10(tmp_path):
    llm = FakeLLM({"100": 0.25, "10": 0.5, "1": 0.25}, mode="split")
    with serve(llm) as url:
        assert _judge(url, tmp_path).score(["q"]) == [pytest.approx(0.25 * 100 + 0.5 * 10 + 0.25 * 1)]
    assert len(llm.requests) == 1  # the greedy path "1", "0", <stop> showed every conditional needed


def test_split_digits_when_server_hides_the_stop_position(tmp_path):
    # Documented rule: where the judge stopped and the server reports no position, P(stop) = 1.
    # Exact here for 85/90/7 (each branch ends with certainty) ...
    with serve(FakeLLM(DIST, mode="split", report_stop=False)) as url:
        assert _judge(url, tmp_path).score(["q"]) == [pytest.approx(EXACT)]
    # ... and an approximation when a stop hides other digits: P(stop | "10") is 2/3 here, taken as 1.
    with serve(FakeLLM({"100": 0.25, "10": 0.5, "1": 0.25}, mode="split", report_stop=False)) as url:
        assert _judge(url, tmp_path / "b").score(["q"]) == [pytest.approx(0.75 * 10 + 0.25 * 1)]


def test_split_digits_without_prefill_uses_documented_approximation(tmp_path):
    # The server rejects a trailing assistant message: other leading digits borrow the greedy
    # branch's continuation ("9" -> "95", "7" -> "75").
    llm = FakeLLM(DIST, mode="split", prefill=False)
    with serve(llm) as url:
        judge = _judge(url, tmp_path)
        assert judge.score(["rate this"]) == [pytest.approx(0.5 * 85 + 0.3 * 95 + 0.2 * 75)]
        assert judge.prefill is False
        n = len(llm.requests)
        judge.score(["another prompt"])
    assert len(llm.requests) == n + 1  # no more prefill attempts once rejected


def test_refusal_and_low_mass_give_none(tmp_path):
    with serve(FakeLLM({"REFUSAL": 0.9, "50": 0.1})) as url:
        assert _judge(url, tmp_path).score(["q"]) == [None]
    with serve(FakeLLM({"Sure": 0.8, "50": 0.2})) as url:  # number mass 0.2 < 0.25
        assert _judge(url, tmp_path / "b").score(["q"]) == [None]


def test_retries_429_then_200_with_backoff(tmp_path):
    llm = FakeLLM(DIST, plan=["429"])
    with serve(llm) as url:
        t0 = time.monotonic()
        assert _judge(url, tmp_path).score(["q"]) == [pytest.approx(EXACT)]
        elapsed = time.monotonic() - t0
    assert len(llm.requests) == 2
    assert elapsed >= 0.3  # first backoff is 0.5 s minus at most 25% jitter


def test_retries_500_then_200(tmp_path):
    llm = FakeLLM(DIST, plan=["500", "500"])
    with serve(llm) as url:
        assert _judge(url, tmp_path).score(["q"]) == [pytest.approx(EXACT)]
    assert len(llm.requests) == 3


def test_retries_after_client_timeout(tmp_path):
    llm = FakeLLM(DIST, plan=["slow"])
    with serve(llm) as url:
        assert _judge(url, tmp_path, timeout=0.5).score(["q"]) == [pytest.approx(EXACT)]
    assert len(llm.requests) == 2


def test_gives_up_after_max_retries_with_one_line_error(tmp_path):
    llm = FakeLLM(DIST, plan=["500"] * 10)
    with serve(llm) as url:
        with pytest.raises(PersonavecError) as err:
            _judge(url, tmp_path, max_retries=1).score(["q"])
    assert len(llm.requests) == 2
    assert "HTTP 500" in str(err.value) and "\n" not in str(err.value)


def test_api_key_never_in_errors_or_cache(tmp_path):
    llm = FakeLLM(DIST, plan=["401"])
    with serve(llm) as url:
        judge = _judge(url, tmp_path)
        with pytest.raises(PersonavecError) as err:
            judge.score(["q"])
        judge.score(["q2"])  # works now; the result is cached
    message = str(err.value)
    assert "HTTP 401" in message
    assert KEY not in message and KEY[:7] + "***" not in message and KEY[-8:] not in message
    assert KEY.encode() not in (tmp_path / "cache.sqlite").read_bytes()
    # nor when there is no server at all
    with pytest.raises(PersonavecError) as err:
        _judge("http://127.0.0.1:9/v1", tmp_path, max_retries=0, timeout=0.5).score(["q3"])
    assert KEY not in str(err.value)


def test_concurrency_limit_and_rerun_makes_no_calls(tmp_path):
    llm = FakeLLM(DIST, delay=0.2)
    prompts = [f"prompt {i}" for i in range(8)]
    with serve(llm) as url:
        judge = _judge(url, tmp_path, concurrency=3)
        first = judge.score(prompts)
        assert 2 <= llm.max_inflight <= 3
        assert judge.stats["calls"] == 8 and judge.stats["requests"] == 8
        again = _judge(url, tmp_path, concurrency=3)
        assert again.score(prompts) == first
        assert again.stats == {"calls": 0, "cache_hits": 8, "requests": 0}
    assert len(llm.requests) == 8


def test_killed_run_resumes_without_paying_twice(tmp_path):
    llm = FakeLLM(DIST)
    llm.fail_after = 3  # the "run dies" after 3 good calls
    prompts = [f"prompt {i}" for i in range(6)]
    with serve(llm) as url:
        with pytest.raises(PersonavecError):
            _judge(url, tmp_path, concurrency=1).score(prompts)
        with sqlite3.connect(tmp_path / "cache.sqlite") as db:
            saved = db.execute("SELECT COUNT(*) FROM judge").fetchone()[0]
        assert saved == 3  # each result was committed as it arrived
        llm.fail_after = None
        judge = _judge(url, tmp_path, concurrency=1)
        assert judge.score(prompts) == [pytest.approx(EXACT)] * 6
        assert judge.stats["calls"] == 3 and judge.stats["cache_hits"] == 3


def test_make_judge_reads_environment(tmp_path, monkeypatch):
    with serve(FakeLLM(DIST)) as url:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # local servers need no key
        judge = make_judge("openai:fake-judge", tmp_path / "c.sqlite")
        assert judge.score(["q"]) == [pytest.approx(EXACT)]
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(PersonavecError, match="OPENAI_API_KEY"):
        make_judge("openai:gpt-4.1-mini", tmp_path / "c.sqlite")
