"""The HTTP side: an OpenAI-compatible API (chat completions, models), health, Prometheus metrics, a dashboard.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
400 bad values or malformed JSON, 401 missing or wrong key, 404 unknown route or model, 413 body too large,
422 a field of the wrong type, 503 the queue is full. The server stays up after every bad request.
"""

# no `from __future__ import annotations`: FastAPI resolves the route annotations (Request) at runtime

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import PersonavecError
from .guards import parse_guard
from .service import Job, PersonaService

INSTALL_HINT = "personavec serve needs its extra: pip install 'personavec[serve]' (fastapi, uvicorn, prometheus-client)"


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_tokens: int = 2048  # the most a request may ask for
    default_max_tokens: int = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, low=None, high=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(422, f"{name} must be {'an integer' if integer else 'a number'}", param=name, code="invalid_type")
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise ApiError(400, f"{name} {value!r} is out of range ({bounds})", param=name, code="invalid_value")
    return value


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "messages must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is served
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param=f"messages[{i}]")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(422, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


def parse_request(body, service: PersonaService, limits: Limits) -> tuple[Job, bool, dict]:
    """A validated Job from a chat completion body, whether it streams, and the stream options."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = _messages(body)
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({param: max_tokens}, param, limits.default_max_tokens, 1, limits.max_tokens, integer=True)
    temperature = _number(body, "temperature", 1.0 if "temperature" in body else 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be above 0", param="top_p", code="invalid_value")
    seed = _number(body, "seed", None, integer=True)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(422, "stream must be true or false", param="stream", code="invalid_type")
    stream_options = body.get("stream_options") or {}
    persona = body.get("persona") or {}
    if not isinstance(persona, dict):
        raise ApiError(422, "persona must be an object", param="persona", code="invalid_type")
    steer = persona.get("steer") or {}
    if not isinstance(steer, dict):
        raise ApiError(422, "persona.steer must map trait names to coefficients", param="persona.steer")
    for name, coef in steer.items():
        if name not in service.traits:
            raise ApiError(400, f"unknown trait {name!r}; served: {', '.join(service.traits) or 'none'}",
                           param="persona.steer", code="unknown_trait")
        _number({f"persona.steer.{name}": coef}, f"persona.steer.{name}", 0.0)
    monitor = persona.get("monitor")
    if monitor is not None:
        if not isinstance(monitor, list) or not all(isinstance(m, str) for m in monitor):
            raise ApiError(422, "persona.monitor must be a list of trait names", param="persona.monitor")
        unknown = [m for m in monitor if m not in service.traits]
        if unknown:
            raise ApiError(400, f"unknown trait {unknown[0]!r}; served: {', '.join(service.traits) or 'none'}",
                           param="persona.monitor", code="unknown_trait")
    coef_mode = persona.get("coef_mode")
    if coef_mode not in (None, "raw", "norm"):
        raise ApiError(400, "persona.coef_mode must be raw or norm", param="persona.coef_mode")
    rules = persona.get("guard") or persona.get("guards") or []
    if isinstance(rules, str):
        rules = [rules]
    if not all(isinstance(r, str) for r in rules):
        raise ApiError(400, "each guard must be a string like TRAIT>X:flag", param="persona.guard",
                       code="invalid_guard")
    try:
        guards = [parse_guard(r) for r in rules]
        service.check_guards(guards)
    except PersonavecError as exc:
        raise ApiError(400, str(exc), param="persona.guard", code="invalid_guard") from None
    prompt_tokens = service.prompt_tokens(messages)
    context = service.context_length
    if context and prompt_tokens + max_tokens > context:
        raise ApiError(400, f"this model's context is {context} tokens; the prompt has {prompt_tokens} and "
                       f"{param} asks for {max_tokens} more", param="messages", code="context_length_exceeded")
    job = Job(messages=messages, max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
              seed=seed, stop=stop, steer={k: float(v) for k, v in steer.items()}, coef_mode=coef_mode,
              monitor=monitor, tokens=bool(persona.get("tokens", False)), guards=service.guards + guards)
    return job, stream, stream_options


class RequestLog:
    """`--log FILE`: one JSON line per request with its readings and actions; text only with `--log-content`."""

    def __init__(self, path: str | Path | None, content: bool = False):
        self.path, self.content = (Path(path) if path else None), content
        self._lock = threading.Lock()

    def write(self, entry: dict, messages: list[dict], answer: str | None) -> None:
        if self.path is None:
            return
        if self.content:
            entry = {**entry, "messages": messages, "answer": answer}
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("personavec_requests", "Chat completion requests by outcome", ["status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("personavec_prompt_tokens", "Prompt tokens served", registry=self.registry)
        self.completion_tokens = Counter("personavec_completion_tokens", "Completion tokens generated",
                                         registry=self.registry)
        self.latency = Histogram("personavec_request_latency_seconds", "Request latency, arrival to last token",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.flagged = Counter("personavec_flagged", "Answers a guard flagged or steered, by trait", ["trait"],
                               registry=self.registry)
        self.queue = Gauge("personavec_queue_depth", "Requests waiting for a batch", registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(service: PersonaService, *, api_key: str | None = None, limits: Limits | None = None,
               log: RequestLog | None = None, recent: int = 200):
    """The FastAPI app serving `service`."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    except ImportError:
        raise PersonavecError(INSTALL_HINT) from None

    limits = limits or Limits()
    log = log or RequestLog(None)
    metrics = Metrics()
    history: deque[dict] = deque(maxlen=recent)
    app = FastAPI(title="personavec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.metrics, app.state.history = service, metrics, history

    def error(exc: ApiError):
        metrics.requests.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else request.query_params.get("key", "")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            return error(ApiError(413, f"the request body is over {limits.max_body_bytes} bytes",
                                  code="request_too_large"))
        return await call_next(request)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "traits": list(service.traits),
                "queue": service.pending}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.set(service.pending)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def keyed(handler):
        """Run `handler()` only for a request with the right key; a 401 in OpenAI's shape otherwise."""
        async def route(request: Request):
            try:
                check_key(request)
            except ApiError as exc:
                return error(exc)
            return handler()
        return route

    @app.get("/v1/models")
    @keyed
    def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "personavec",
                                            "persona": {"traits": {n: {"layer": t.layer} for n, t in
                                                                   service.traits.items()},
                                                        "guards": [str(g) for g in service.guards]}}]}

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse((resources.files("personavec.serve") / "dashboard.html").read_text(encoding="utf-8"))

    @app.get("/api/requests")
    @keyed
    def recent_requests():
        return {"traits": list(service.traits), "requests": list(history)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        try:
            check_key(request)
            raw = await request.body()
            if len(raw) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over {limits.max_body_bytes} bytes", code="request_too_large")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
            model = body.get("model") if isinstance(body, dict) else None
            if model not in (None, service.model_name):
                raise ApiError(404, f"the model {model!r} does not exist; this server serves {service.model_name!r}",
                               param="model", code="model_not_found")
            job, stream, stream_options = parse_request(body, service, limits)
        except ApiError as exc:
            return error(exc)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_delta = lambda text: loop.call_soon_threadsafe(events.put_nowait, ("delta", text))
        job.on_done = lambda result, exc: loop.call_soon_threadsafe(events.put_nowait, ("done", (result, exc)))
        try:
            service.submit(job)
        except OverflowError:
            return error(ApiError(503, "the server is busy: the request queue is full", "server_error",
                                  code="overloaded"))
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def finished(result) -> dict:
            usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                     "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
            persona = result["persona"]
            latency = time.monotonic() - arrived
            metrics.requests.labels(status="200").inc()
            metrics.prompt_tokens.inc(result["prompt_tokens"])
            metrics.completion_tokens.inc(result["completion_tokens"])
            metrics.latency.observe(latency)
            for trait in {a["trait"] for a in persona["actions"] if a["action"] in ("flag", "steer")}:
                metrics.flagged.labels(trait=trait).inc()
            entry = {"id": request_id, "created": created, "model": service.model_name, "latency_s": round(latency, 4),
                     "finish_reason": result["finish_reason"], "usage": usage, "batch_size": result["batch_size"],
                     "persona": {k: v for k, v in persona.items() if k != "tokens"}}
            log.write(entry, job.messages, result["text"])
            history.append({**entry, "question": job.messages[-1]["content"][:300], "answer": result["text"],
                            "tokens": result["tokens"]})
            return usage

        async def wait_done():
            while True:
                kind, payload = await events.get()
                if kind == "done":
                    return payload

        if not stream:
            try:
                result, exc = await wait_done()
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            if exc is not None or result is None:
                return error(ApiError(500, f"generation failed: {exc}", "server_error", code="internal_error"))
            usage = finished(result)
            return {"id": request_id, "object": "chat.completion", "created": created, "model": service.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                                 "finish_reason": result["finish_reason"], "logprobs": None}],
                    "usage": usage, "persona": result["persona"]}

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": service.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def sse():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        yield chunk({"content": payload})
                        continue
                    result, exc = payload
                    if exc is not None or result is None:
                        yield f"data: {json.dumps(ApiError(500, f'generation failed: {exc}', 'server_error').body())}\n\n"
                        break
                    usage = finished(result)
                    extra = {"persona": result["persona"]}
                    if stream_options.get("include_usage"):
                        extra["usage"] = usage
                    yield chunk({}, result["finish_reason"], **extra)
                    break
                yield "data: [DONE]\n\n"
            finally:  # a client that went away frees its row at the next decode step
                job.cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app
