"""A real OpenAI-compatible chat-completions server on 127.0.0.1 whose answers a test scripts.

`ScriptedChat(respond)` answers each request with `respond(body) -> str` (the
assistant's content). `plan` lists failures to serve first, one per request:
"429" (with a short ``retry-after-ms``), "500", or "401" (which echoes the key,
as some servers do).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@contextmanager
def serve_handler(handler: type[BaseHTTPRequestHandler]):
    """Serve `handler` on an ephemeral 127.0.0.1 port in a thread; yield the `/v1` base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


class ScriptedChat:
    def __init__(self, respond: Callable[[dict], str], plan=()):
        self.respond, self.plan = respond, list(plan)
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()


@contextmanager
def serve_chat(chat: ScriptedChat):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def reply(self, status, obj, headers=()):
            data = json.dumps(obj).encode()
            with chat.lock:
                chat.statuses.append(status)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with chat.lock:
                chat.requests.append(body)
                action = chat.plan.pop(0) if chat.plan else "ok"
            if action == "429":
                return self.reply(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                                  [("retry-after-ms", "10")])
            if action == "500":
                return self.reply(500, {"error": {"message": "internal error", "type": "server_error"}},
                                  [("retry-after-ms", "10")])
            if action == "401":
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                return self.reply(401, {"error": {"message": f"Incorrect API key provided: {key}. "
                                                  f"You passed {key[:7]}***{key[-4:]}", "type": "auth"}})
            content = chat.respond(body)
            return self.reply(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    with serve_handler(Handler) as url:
        yield url
