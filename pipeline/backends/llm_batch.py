"""The Batch API file formats: OpenAI's Batch API and `vllm run-batch` read and write the same JSONL.

Request file, one line per request:
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {<chat request>}}
Results file, one line per request, in any order:
    {"id": "...", "custom_id": "...", "response": {"status_code": 200, "request_id": "...", "body": {<completion>}},
     "error": null}
A request that failed has an `error` (an object with `message` from OpenAI, a string from vLLM) or a non-200
`status_code`. Answers get the same checks as live ones (refusal, empty, truncated, filtered).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .llm import DEFAULT_PRICES, ChatRequest, ChatResult, Completion, LLMFailure, cost_usd, price_for, redact

CHAT_COMPLETIONS_URL = "/v1/chat/completions"
BATCH_PRICE_FACTOR = 0.5  # OpenAI bills Batch API tokens at half the live price


def export_batch_jsonl(requests: Sequence[tuple[str, ChatRequest]], path: Path) -> None:
    """Write (custom_id, request) pairs as a Batch API request file (atomically: a temporary file, then rename)."""
    seen: set[str] = set()
    lines = []
    for custom_id, request in requests:
        if not isinstance(custom_id, str) or not custom_id:
            raise ValueError(f"a batch custom_id must be a non-empty string, got {custom_id!r}")
        if custom_id in seen:
            raise ValueError(f"duplicate batch custom_id {custom_id!r}: results are matched to requests by it")
        seen.add(custom_id)
        line = {"custom_id": custom_id, "method": "POST", "url": CHAT_COMPLETIONS_URL, "body": request.body()}
        lines.append(json.dumps(line, ensure_ascii=False))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class BatchResults:
    """A results file, read: the answer per custom_id, the lines that are not results at all (skipped, each
    "FILE:LINE: why"), and the custom_ids that appear on more than one line."""
    answers: dict[str, ChatResult | LLMFailure] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


def import_batch_jsonl(path: Path, *, prices: dict[str, tuple[float, float]] | None = None,
                       max_tokens: int | None = None) -> BatchResults:
    """Read a Batch API results file. Cost uses `prices` (extending DEFAULT_PRICES) at the Batch API rate; an
    answer longer than `max_tokens` allows fails as in a live run. A line that is not a result (not JSON, no
    custom_id) is skipped and named, never the end of the import; requests missing from the file are absent."""
    prices = {**DEFAULT_PRICES, **(prices or {})}
    out = BatchResults()
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                out.skipped.append(f"{path}:{number}: not a JSON line ({e})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
                out.skipped.append(f"{path}:{number}: not a batch result (no custom_id)")
                continue
            custom_id = record["custom_id"]
            if custom_id in out.answers and custom_id not in out.duplicates:
                out.duplicates.append(custom_id)
            out.answers[custom_id] = _result(record, prices, max_tokens)
    return out


def _result(record: dict[str, Any], prices: dict[str, tuple[float, float]], max_tokens: int | None
            ) -> ChatResult | LLMFailure:
    response = record.get("response") if isinstance(record.get("response"), dict) else {}
    body = response.get("body")
    if record.get("error"):
        return LLMFailure(f"batch request failed: {_message(record['error'])}")
    status = response.get("status_code")
    if status != 200:
        detail = _message(body.get("error")) if isinstance(body, dict) and body.get("error") else "no detail"
        return LLMFailure(f"HTTP {status}: {detail}")
    try:
        completion = Completion.from_body(body)
    except LLMFailure as e:
        return e
    problem = completion.problem(max_tokens)
    if problem:
        return LLMFailure(problem)
    price = price_for(completion.model, prices)
    cost = BATCH_PRICE_FACTOR * cost_usd(price, completion.prompt_tokens, completion.completion_tokens) if price \
        else 0.0
    return completion.result(cost)


def _message(error: Any) -> str:
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        text = f"{code}: {message}" if code and message else str(message or code or error)
    else:
        text = str(error)
    return redact(" ".join(text.split())[:300], os.environ.get("OPENAI_API_KEY"))
