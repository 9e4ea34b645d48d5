"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

    with OpenAITestServer(latency=0.2) as server:
        server.fail_next(2, "rate_limit", retry_after="1")        # the next 2 requests get 429 + Retry-After
        server.fail_matching("clip-07", "refusal")                 # every request whose prompt holds "clip-07"
        client = ChatClient(server.base_url, ...)

The default answer is deterministic: "caption for <hash of the prompt>" (plus the sizes of the images it was
shown), with usage counted in whitespace-separated words (`count_tokens`) and IMAGE_TOKENS per image, so a test
can check token counts and cost exactly. Images must be data: URLs holding a real image (base64 JPEG or PNG).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

IMAGE_TOKENS = 85  # what OpenAI bills a low-detail image; any fixed number keeps the cost exact
REFUSAL = "I'm sorry, I can't help with that."
REFUSAL_TEXT = "I'm sorry, but I can't assist with that request."

FAULTS = (
    "rate_limit",      # 429 with Retry-After
    "server_error",    # 500
    "unavailable",     # 503 (with Retry-After when given)
    "bad_request",     # 400 (never worth retrying)
    "slow",            # answers after `slow_seconds`, later than a client timeout
    "malformed",       # 200 with a body that is not JSON
    "refusal",         # message.refusal set, content null (OpenAI's structured refusal)
    "refusal_text",    # the refusal as plain content
    "empty",           # whitespace content
    "length",          # finish_reason "length" with a cut answer
    "content_filter",  # finish_reason "content_filter", no content
    "long",            # finish_reason "stop" with far more words than max_tokens (usage counts them)
    "long_word",       # finish_reason "stop", one 1 MB word: one token by this server's count, too many characters
    "unauthorized",    # 401 whose message echoes the Authorization header in full, as some servers do
)


def count_tokens(text: str) -> int:
    return len(text.split())


@dataclass
class _Rule:
    fault: str
    remaining: int | None      # None: every matching request
    marker: str | None         # None: any request
    retry_after: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False      # a "slow" handler must not hold up stop()
    request_queue_size = 256    # the default backlog of 5 drops connections a concurrent client opens at once


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class OpenAITestServer:
    """Serves POST /v1/chat/completions from a background thread until `stop()` (or the end of a `with`)."""

    def __init__(self, *, latency: float = 0.0, slow_seconds: float = 3.0):
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.bodies: list[dict[str, Any]] = []          # every request body received, faulted ones included
        self.arrival_times: list[float] = []            # time.monotonic() at each request
        self.authorizations: list[str | None] = []      # the Authorization header of each request
        self.max_in_flight = 0
        self._in_flight = 0
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.bodies)

    def start(self) -> OpenAITestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping on latency or a "slow" fault
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, count: int, fault: str, *, retry_after: str | None = None) -> None:
        """The next `count` requests (after any marker rule has had its pick) get `fault`."""
        self._add_rule(_Rule(_checked(fault), count, None, retry_after))

    def fail_matching(self, marker: str, fault: str, *, count: int | None = None,
                      retry_after: str | None = None) -> None:
        """Requests whose prompt text contains `marker` get `fault` (all of them, or the next `count`)."""
        self._add_rule(_Rule(_checked(fault), count, marker, retry_after))

    def _add_rule(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _fault_for(self, prompt: str) -> _Rule | None:
        with self._lock:
            candidates = ([r for r in self._rules if r.marker is not None and r.marker in prompt]
                          + [r for r in self._rules if r.marker is None])
            for rule in candidates:
                if rule.remaining is None or rule.remaining > 0:
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
        return None

    def _record(self, body: Any, authorization: str | None) -> None:
        with self._lock:
            self.bodies.append(body)
            self.arrival_times.append(time.monotonic())
            self.authorizations.append(authorization)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def respond(self, raw: bytes, authorization: str | None) -> tuple[int, dict[str, str], bytes]:
        """One request body in, (status, headers, body) out."""
        try:
            body = json.loads(raw)
        except ValueError:
            self._record(None, authorization)
            return _error(400, "request body is not JSON")
        self._record(body, authorization)
        try:
            prompt, image_sizes = _read_request(body)
        except _HTTPError as e:
            return _error(e.status, str(e))
        rule = self._fault_for(prompt)
        fault = rule.fault if rule else None
        self._stopping.wait(self.slow_seconds if fault == "slow" else self.latency)
        headers = {"Retry-After": rule.retry_after} if rule and rule.retry_after is not None else {}
        if fault == "rate_limit":
            return _error(429, "Rate limit reached for requests", headers)
        if fault == "server_error":
            return _error(500, "The server had an error while processing your request")
        if fault == "unavailable":
            return _error(503, "The engine is currently overloaded, please try again later", headers)
        if fault == "bad_request":
            return _error(400, "Invalid value for 'messages'")
        if fault == "unauthorized":
            return _error(401, f"Incorrect API key provided: {(authorization or '').removeprefix('Bearer ')}; "
                               f"the request had Authorization: {authorization}")
        if fault == "malformed":
            return 200, {"Content-Type": "application/json"}, b'{"id": "chatcmpl-broken", "choices": [{"mess'
        return 200, {"Content-Type": "application/json"}, json.dumps(_completion(body, prompt, image_sizes,
                                                                                   fault)).encode()


def _checked(fault: str) -> str:
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose one of {FAULTS}")
    return fault


def _read_request(body: Any) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text (all text content, in order) and the sizes of the images, or a 400."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _HTTPError(400, "'model' is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _HTTPError(400, "'messages' must be a non-empty list")
    texts, sizes = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise _HTTPError(400, "each message needs 'content': a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                sizes.append(_image_size(part.get("image_url")))
            else:
                raise _HTTPError(400, f"unsupported content part type {kind!r}")
    return "\n".join(texts), sizes


def _image_size(image_url: Any) -> tuple[int, int]:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise _HTTPError(400, "this server only accepts images as base64 data: URLs")
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True))) as image:
            image.load()
            return image.size
    except (ValueError, OSError) as e:
        raise _HTTPError(400, f"invalid image: {e}") from None


def _completion(body: dict, prompt: str, image_sizes: list[tuple[int, int]], fault: str | None) -> dict:
    digest = hashlib.sha256(json.dumps([prompt, image_sizes]).encode()).hexdigest()[:12]
    answer = f"caption for {digest}"
    if image_sizes:
        answer += f" with {len(image_sizes)} images " + " ".join(f"{w}x{h}" for w, h in image_sizes)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    words = answer.split()
    finish = "stop"
    if fault == "long":
        words = words * 20_000
    elif fault == "long_word":
        words = ["x" * 1_000_000]
    elif (isinstance(limit, int) and len(words) > limit) or fault == "length":
        words = words[:min(limit, len(words) - 1) if isinstance(limit, int) else len(words) - 1]
        finish = "length"
    content: str | None = " ".join(words)
    refusal = None
    if fault == "refusal":
        content, refusal = None, REFUSAL
    elif fault == "refusal_text":
        content = REFUSAL_TEXT
    elif fault == "empty":
        content = "  \n"
    elif fault == "content_filter":
        content, finish = None, "content_filter"
    completion_tokens = count_tokens(content or refusal or "")
    prompt_tokens = count_tokens(prompt) + IMAGE_TOKENS * len(image_sizes)
    return {
        "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                     "message": {"role": "assistant", "content": content, "refusal": refusal}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def _handler_for(server: OpenAITestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real API server
        # Headers and body leave in one segment: written separately, Nagle's algorithm and the client's delayed
        # ACK add ~40 ms to every answer.
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(*_error(404, f"no route {self.path}"))
                return
            server._enter()
            try:
                self._send(*server.respond(raw, self.headers.get("Authorization")))
            finally:
                server._leave()

        def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()
            except OSError:
                self.close_connection = True  # the client gave up (timeout) and closed its end

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler
