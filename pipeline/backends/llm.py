"""Chat client for any OpenAI-compatible endpoint (OpenAI, a vLLM server running Video-LLaVA or Qwen2-VL, ...).

    client = ChatClient("http://gpu-box:8000/v1", cache_dir=store_root / "llm-cache", concurrency=16)
    results = client.complete_many([ChatRequest("gpt-4o-mini", (user_message(prompt, frames_jpeg),)), ...])
    # same order as the requests; each a ChatResult or an LLMFailure whose message a person can read

What it adds to the openai package: bounded concurrency shared by every thread that uses one client; retries it
counts itself (429, 5xx, timeouts, connection errors; exponential backoff with full jitter; Retry-After honoured);
a persistent response cache keyed by the full request and endpoint, so a rerun sends nothing; refusal, empty,
truncated and filtered answers reported as failures (and never cached); tokens and cost counted.
The Batch API file formats (OpenAI Batch, `vllm run-batch`) live in `llm_batch`.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .llm_cache import ResponseCache

if TYPE_CHECKING:
    import openai   # imported where a client starts: half a second that `status` and `train` need not pay

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"

# USD per 1M input / output tokens, OpenAI list prices (2025). The project config can override or add models;
# a dated snapshot ("gpt-4o-mini-2024-07-18") is priced as its base name.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}

# A local server (vLLM) needs no key, but the openai package refuses to start without one.
_PLACEHOLDER_KEY = "no-key-set"
_RETRIED_STATUSES = frozenset({408, 409, 429})  # and every 5xx


class LLMFailure(Exception):
    """A request that produced no usable answer; str() is one line a person can read."""


@dataclass(frozen=True)
class ChatRequest:
    """Everything that determines the answer. `messages` are OpenAI chat messages; a message's content may be a
    list of parts, image parts included (see `user_message`)."""
    model: str
    messages: tuple[dict, ...]
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0

    def __post_init__(self):
        object.__setattr__(self, "messages", tuple(self.messages))
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("a ChatRequest needs a model name")
        if not self.messages or not all(isinstance(m, dict) and "role" in m for m in self.messages):
            raise ValueError("ChatRequest.messages must be a non-empty sequence of dicts, each with a 'role'")

    def body(self) -> dict[str, Any]:
        """The chat-completions request body. Numbers are normalised (temperature 0 and 0.0 are one request)."""
        body = {"model": self.model, "messages": list(self.messages), "max_tokens": int(self.max_tokens),
                "temperature": float(self.temperature)}
        if self.seed is not None:
            body["seed"] = int(self.seed)
        return body

    def key(self, base_url: str) -> str:
        """Cache key: sha256 of the canonical JSON of the request body and the endpoint it is sent to."""
        return hashlib.sha256(_canonical({"endpoint": base_url.rstrip("/"), "request": self.body()})).hexdigest()

    def __hash__(self) -> int:
        return hash(_canonical(self.body()))


def _canonical(value: Any) -> bytes:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"the request cannot be hashed into a cache key: {e}") from None


def image_part(image: bytes, mime: str = "image/jpeg") -> dict[str, Any]:
    """An image content part holding the encoded image inline (a data: URL), as OpenAI and vLLM accept it."""
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(image).decode()}"}}


def user_message(text: str, images: Sequence[bytes] = ()) -> dict[str, Any]:
    """A user message: the images (JPEG bytes, e.g. a clip's face crops), then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*(image_part(image) for image in images), {"type": "text", "text": text}]}


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool                 # served from the response cache: nothing was sent (or spent) for it this time
    cost_usd: float              # what the answer cost when it was made (0 for a model without a price)
    model: str = ""              # the model that answered, as the server names it


@dataclass
class UsageStats:
    """What this client sent and spent. Cache hits cost nothing and count in `cache_hits` only."""
    requests_sent: int = 0       # HTTP requests, retries included
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_models: list[str] = field(default_factory=list)  # models without a price, counted as cost 0


# An answer that is nothing but a refusal. Only short answers are checked, so a real description that happens to
# contain "I cannot" is never taken for one.
_REFUSAL = re.compile(
    r"^(?:(?:i'm|i am|im)\s+(?:so\s+|very\s+)?sorry|sorry|i apologi[sz]e|unfortunately|as an ai\b)"
    r"[^.!?]{0,40}?\b(?:i|as an ai)\b[^.!?]{0,30}?(?:can't|cannot|can not|won't|will not|unable|not able)\b"
    r"|^(?:i\s+(?:can't|cannot|can not|won't|will not|am unable to|am not able to)|i'm\s+(?:unable|not able) to)"
    r"\s+(?:help|assist|comply|provide|fulfil|do that|answer|describe|identify|analy[sz]e|process|support)",
    re.IGNORECASE)
_REFUSAL_MAX_CHARS = 300

# An answer may not be longer than its request allows: by the tokens the server counted, nor by characters (a
# server that miscounts, or a cache file from elsewhere). 32 characters a token is generous: English text averages
# about 4, and a whole answer of the longest tokens stays under it.
MAX_CHARS_PER_TOKEN = 32


def over_bound(text: str, completion_tokens: int, max_tokens: int | None) -> str | None:
    """Why an answer is longer than a request for `max_tokens` allows, or None."""
    if not max_tokens or max_tokens <= 0:
        return None
    if completion_tokens > max_tokens:
        return f"answer longer than the request allows ({completion_tokens} tokens, max_tokens {max_tokens})"
    if len(text) > MAX_CHARS_PER_TOKEN * max_tokens:
        return (f"answer longer than the request allows ({len(text)} characters for max_tokens {max_tokens}, at "
                f"most {MAX_CHARS_PER_TOKEN * max_tokens})")
    return None


# What looks like an API key in a server's error message: OpenAI-style secret keys, bearer tokens, key=... pairs.
_SECRET = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}|(?<=Bearer )[A-Za-z0-9._~+/\-]{6,}=*"
                     r"|(?<=api[_-]key[=: ])['\"]?[A-Za-z0-9._\-]{6,}", re.IGNORECASE)
REDACTED = "[redacted]"


def redact(text: str, *secrets: str | None) -> str:
    """`text` with the given secrets (the API key in use) and anything that looks like a key replaced."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return _SECRET.sub(REDACTED, text)


def is_refusal(text: str) -> bool:
    text = text.strip().replace("\u2019", "'")
    return len(text) <= _REFUSAL_MAX_CHARS and _REFUSAL.search(text) is not None


@dataclass
class Completion:
    """One choice of a chat-completions response body, read but not yet judged."""
    text: str
    refusal: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str

    @classmethod
    def from_body(cls, body: Any) -> Completion:
        """Read a response body; LLMFailure("malformed response: ...") when it is not one."""
        if not isinstance(body, dict):
            raise LLMFailure(f"malformed response: expected a JSON object, got {type(body).__name__}")
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMFailure("malformed response: no choices")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise LLMFailure("malformed response: the choice has no message")
        content, refusal = message.get("content"), message.get("refusal")
        if not isinstance(content, (str, type(None))) or not isinstance(refusal, (str, type(None))):
            raise LLMFailure("malformed response: message content is not text")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return cls(text=content or "", refusal=refusal or "", finish_reason=str(choices[0].get("finish_reason")),
                   prompt_tokens=_count(usage.get("prompt_tokens")),
                   completion_tokens=_count(usage.get("completion_tokens")), model=str(body.get("model") or ""))

    @classmethod
    def from_text(cls, text: str) -> Completion:
        try:
            body = json.loads(text)
        except ValueError as e:
            raise LLMFailure(f"malformed response: not JSON ({e}): {text[:80]!r}") from None
        return cls.from_body(body)

    def problem(self, max_tokens: int | None = None) -> str | None:
        """Why this answer is unusable (for a request of `max_tokens`), or None when it is a real answer."""
        if self.refusal.strip():
            return f"refused: {self.refusal.strip()}"
        if self.finish_reason == "content_filter":
            return "blocked by the content filter (finish_reason=content_filter)"
        if self.finish_reason == "length":
            return "truncated answer (finish_reason=length)"
        if not self.text.strip():
            return "empty answer"
        too_long = over_bound(self.text.strip(), self.completion_tokens, max_tokens)
        if too_long:
            return too_long
        if is_refusal(self.text):
            return f"refused: {self.text.strip()}"
        return None

    def result(self, cost_usd: float, cached: bool = False) -> ChatResult:
        return ChatResult(self.text.strip(), self.finish_reason, self.prompt_tokens, self.completion_tokens,
                          cached, cost_usd, self.model)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def price_for(model: str, prices: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The (input, output) price of a model, its dated snapshots included; None when unknown."""
    if model in prices:
        return prices[model]
    bases = [name for name in prices if model.startswith(name + "-")]
    return prices[max(bases, key=len)] if bases else None


def cost_usd(price: tuple[float, float], prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


class _LoopThread:
    """An event loop in a daemon thread. complete_many hands its work to it, so it can be called from any thread
    (Dask worker threads, a notebook that runs its own loop), and all calls share one connection pool and one
    concurrency bound."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="affectprep-llm", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C in the caller: stop the requests in flight too
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class ChatClient:
    def __init__(self, base_url: str | None = None, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 16,
                 timeout: float = 60.0, max_retries: int = 6, backoff_base: float = 0.5, backoff_max: float = 60.0,
                 cache_dir: Path | None = None, prices: dict[str, tuple[float, float]] | None = None):
        """`base_url` defaults to $OPENAI_BASE_URL, else OpenAI. The key is read only from $`api_key_env`.
        `concurrency` bounds the requests in flight across all threads using this client. `max_retries` is the
        number of retries after the first attempt. `prices` (USD per 1M input / output tokens) extend or
        override DEFAULT_PRICES. Without `cache_dir` nothing is cached."""
        if concurrency < 1 or timeout <= 0 or max_retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError("ChatClient needs concurrency >= 1, timeout > 0, and max_retries, backoff_base and "
                             "backoff_max >= 0")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.prices = {**DEFAULT_PRICES, **(prices or {})}
        self.cache = ResponseCache(Path(cache_dir)) if cache_dir is not None else None
        self.stats = UsageStats()
        self._stats_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._runner: _LoopThread | None = None
        self._openai: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the loop thread; a later call starts them again."""
        with self._start_lock:
            runner, self._runner = self._runner, None
            if runner is not None:
                runner.run(self._openai.close())
                runner.stop()

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[ChatResult | LLMFailure]:
        """One answer per request, in order. A request that fails becomes an LLMFailure in its place; this never
        raises for one. Identical requests in one call are sent once."""
        requests = list(requests)
        results: list[ChatResult | LLMFailure | None] = [None] * len(requests)
        slots: dict[str, list[int]] = {}
        unique: dict[str, ChatRequest] = {}
        for i, request in enumerate(requests):
            if not isinstance(request, ChatRequest):
                results[i] = LLMFailure(f"invalid request: expected a ChatRequest, got {type(request).__name__}")
                continue
            try:
                key = request.key(self.base_url)
            except ValueError as e:
                results[i] = LLMFailure(f"invalid request: {e}")
                continue
            slots.setdefault(key, []).append(i)
            unique.setdefault(key, request)

        answers = self._cached(unique)
        self._add(cache_hits=sum(len(slots[key]) for key in answers))
        missing = {key: request for key, request in unique.items() if key not in answers}
        if missing:
            answers.update(self._loop().run(self._complete_all(missing)))
        for key, answer in answers.items():
            for i in slots[key]:
                results[i] = answer
        return results

    def _cached(self, requests: dict[str, ChatRequest]) -> dict[str, ChatResult | LLMFailure]:
        if self.cache is None:
            return {}
        found = {}
        for key, record in self.cache.get_many(list(requests)).items():
            try:
                if over_bound(str(record["text"]), int(record["completion_tokens"]), requests[key].max_tokens):
                    continue   # written before answers were bounded: ask again, and judge the new answer
                found[key] = ChatResult(str(record["text"]), str(record["finish_reason"]),
                                        int(record["prompt_tokens"]), int(record["completion_tokens"]), True,
                                        float(record["cost_usd"]), str(record.get("model", "")))
            except (KeyError, TypeError, ValueError):
                continue  # a record from an incompatible version: ask again
        return found

    def _loop(self) -> _LoopThread:
        with self._start_lock:
            if self._runner is None:
                runner = _LoopThread()
                self._openai, self._semaphore = runner.run(self._open())
                self._runner = runner
                weakref.finalize(self, runner.stop)
            return self._runner

    async def _open(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        import openai

        client = openai.AsyncOpenAI(api_key=os.environ.get(self.api_key_env) or _PLACEHOLDER_KEY,
                                    base_url=self.base_url, timeout=self.timeout, max_retries=0)
        return client, asyncio.Semaphore(self.concurrency)

    async def _complete_all(self, requests: dict[str, ChatRequest]) -> dict[str, ChatResult | LLMFailure]:
        keys = list(requests)
        answers = await asyncio.gather(*(self._complete(key, requests[key]) for key in keys))
        return dict(zip(keys, answers))

    async def _complete(self, key: str, request: ChatRequest) -> ChatResult | LLMFailure:
        try:
            result = await self._send(request)
        except LLMFailure as e:   # its message is stored with the sample: never with the key in it
            return LLMFailure(redact(str(e), os.environ.get(self.api_key_env)))
        except Exception as e:  # noqa: BLE001 - one odd reply must never take the other requests down
            return LLMFailure(redact(f"{type(e).__name__}: {e}", os.environ.get(self.api_key_env)))
        if self.cache is not None:
            record = {**dataclasses.asdict(result), "request_model": request.model, "endpoint": self.base_url,
                      "created": time.time()}
            del record["cached"]
            try:
                self.cache.put(key, record)
            except OSError as e:
                log.warning("could not cache an LLM answer under %s: %s", self.cache.root, e)
        return result

    async def _send(self, request: ChatRequest) -> ChatResult:
        """The answer, after retries; LLMFailure when there is none."""
        import openai

        body = request.body()
        attempt = 0
        while True:
            attempt += 1
            wait = None
            async with self._semaphore:
                self._add(requests_sent=1)
                try:
                    # The raw body, not the typed `chat.completions.create`: its parameter transform costs more CPU
                    # than the rest of a request, and the answer is judged from the JSON here as for batch results.
                    text = await self._openai.post("/chat/completions", cast_to=str, body=body)
                except openai.APITimeoutError:
                    problem, detail = "timed out", f" (timeout {self.timeout:g} s)"
                except openai.APIConnectionError as e:
                    problem, detail = "connection failed", f": {e.__cause__ or e}"
                except openai.APIStatusError as e:
                    if not (e.status_code in _RETRIED_STATUSES or e.status_code >= 500):
                        raise LLMFailure(self._refused_status(e, request)) from None
                    problem, detail = f"HTTP {e.status_code}", f": {_error_detail(e)}"
                    wait = _retry_after(e.response.headers)
                else:
                    return self._judge(Completion.from_text(text), request)
            if attempt > self.max_retries:
                raise LLMFailure(f"{problem} after {attempt} attempt{'s' if attempt > 1 else ''}{detail}")
            self._add(retries=1)
            await asyncio.sleep(self._backoff(attempt, wait))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter over an exponential ceiling; a server's Retry-After is a floor (both capped by
        backoff_max)."""
        jitter = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))
        return jitter if retry_after is None else max(min(retry_after, self.backoff_max), jitter)

    def _refused_status(self, error: openai.APIStatusError, request: ChatRequest) -> str:
        detail = _error_detail(error)
        if error.status_code == 401:
            return f"HTTP 401 unauthorised: {detail} (the key is read from ${self.api_key_env})"
        if error.status_code == 404:
            return f"HTTP 404 not found: {detail} (model {request.model!r} at {self.base_url})"
        return f"HTTP {error.status_code}: {detail}"

    def _judge(self, completion: Completion, request: ChatRequest) -> ChatResult:
        """Count what the answer cost (a refusal is billed too), then accept it or raise LLMFailure."""
        price = price_for(request.model, self.prices) or price_for(completion.model, self.prices)
        cost = cost_usd(price, completion.prompt_tokens, completion.completion_tokens) if price else 0.0
        self._add(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                  cost_usd=cost)
        if price is None:
            self._note_unpriced(request.model)
        problem = completion.problem(request.max_tokens)
        if problem:
            raise LLMFailure(problem)
        return completion.result(cost)

    def _add(self, **counts: float) -> None:
        with self._stats_lock:
            for name, value in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _note_unpriced(self, model: str) -> None:
        with self._stats_lock:
            if model in self.stats.unpriced_models:
                return
            self.stats.unpriced_models.append(model)
        log.warning("no price for model %r: its cost is counted as 0 (add it to the LLM prices in the config)",
                    model)


def _error_detail(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text = body["message"]
    elif isinstance(body, str) and body.strip():
        text = body
    else:
        text = error.message
    return " ".join(text.split())[:300]


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP-date)."""
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
