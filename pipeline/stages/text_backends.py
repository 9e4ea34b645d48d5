"""What the text stages share: backend specs ("openai:gpt-4o-mini"), prompt files, the chat client, usage rows."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..backends.llm import OPENAI_BASE_URL, ChatClient, ChatResult, LLMFailure
from ..facs import DEFAULT as PROMPTS_DIR
from ..stage import failed_row, file_digest


def parse_backend(spec: str, known: tuple[str, ...], where: str) -> tuple[str, str]:
    """"openai:gpt-4o-mini" -> ("openai", "gpt-4o-mini"); "motion" -> ("motion", "")."""
    kind, _, model = spec.partition(":")
    if kind not in known:
        forms = ", ".join(f"{k}:<model>" if k in _NEEDS_MODEL else k for k in known)
        raise ValueError(f"{where}: unknown backend '{spec}'; use one of {forms}")
    if kind in _NEEDS_MODEL and not model:
        raise ValueError(f"{where}: '{kind}' needs a model, e.g. '{kind}:{_EXAMPLES[kind]}'")
    return kind, model


_NEEDS_MODEL = ("openai", "hf", "vllm", "t5")
_EXAMPLES = {"openai": "gpt-4o-mini", "hf": "LanguageBind/Video-LLaVA-7B-hf", "vllm": "llava-hf/LLaVA-NeXT-Video-7B-hf",
             "t5": "google/flan-t5-base"}


# How requests are sent and priced, not what they ask: never part of a text version's key. (Cost is counted from
# the prices when an answer arrives, so a changed price table prices the next answers, not a new version.)
OPERATIONAL = ("concurrency", "timeout", "max_retries", "prices")


def keyed_text_config(config: dict[str, Any], kind: str) -> dict[str, Any]:
    """A text stage's config as its key sees it, without what its backend never reads: the endpoint only where
    an OpenAI-compatible server answers (it names the model that answers), the device only where a local model
    runs on it, no temperature for the local models (they decode greedily), no prompt or generation parameters for
    the motion captioner and the template."""
    unused = set() if kind == "openai" else {"base_url"}
    if kind not in ("hf", "vllm", "t5"):
        unused.add("device")
    else:
        unused.add("temperature")
    if kind in ("motion", "template"):
        unused |= {"prompt", "max_tokens", "temperature", "num_frames"}
    return {k: v for k, v in config.items() if k not in unused}


def prompt_file(name: str) -> Path:
    path = PROMPTS_DIR / name
    if not path.is_file():
        raise ValueError(f"prompt template {name} not found in {PROMPTS_DIR}")
    return path


def prompt_identity(name: str) -> dict[str, str]:
    return {"prompt": name, "prompt_sha256": file_digest(prompt_file(name))}


def chat_client(config: Any, context: dict[str, Any]) -> ChatClient:
    """One client per worker: bounded concurrency, retries, and the response cache shared by every run."""
    cache = Path(context["cache"]) / "llm_responses" if context.get("cache") else None
    prices = {model: tuple(price) for model, price in (config.prices or {}).items()}
    client = ChatClient(config.base_url, concurrency=config.concurrency, timeout=config.timeout,
                        max_retries=config.max_retries, cache_dir=cache, prices=prices)
    if client.base_url == OPENAI_BASE_URL.rstrip("/") and not os.environ.get(client.api_key_env):
        raise ValueError(f"the OpenAI API needs ${client.api_key_env}; for a local OpenAI-compatible server "
                         f"(vLLM, ...) set base_url, e.g. --base-url http://localhost:8000/v1")
    return client


def text_row(sample_id: str, answer: ChatResult | LLMFailure, field: str, backend: str, model: str,
             **extra: Any) -> dict[str, Any]:
    """The row of one answer. Tokens and cost count what this run sent: an answer the response cache served
    cost nothing now (its first run paid for it), so a version filled from the cache costs 0."""
    if isinstance(answer, LLMFailure):
        return failed_row(sample_id, str(answer))
    sent = not answer.cached
    return {"sample_id": sample_id, "status": "ok", "error": None, field: answer.text.strip(), "backend": backend,
            "model": model, "prompt_tokens": answer.prompt_tokens if sent else 0,
            "completion_tokens": answer.completion_tokens if sent else 0,
            "cost_usd": answer.cost_usd if sent else 0.0, **extra}


def offline_row(sample_id: str, field: str, text: str, backend: str, model: str, **extra: Any) -> dict[str, Any]:
    """A row for a backend with no token accounting (local models, the template, the motion captioner)."""
    return {"sample_id": sample_id, "status": "ok", "error": None, field: text, "backend": backend, "model": model,
            "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, **extra}


def decode_crops(crops: list[bytes]) -> np.ndarray:
    """JPEG crops -> (T, H, W, 3) uint8 RGB."""
    return np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(c, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                     for c in crops])


def evenly(items: list, count: int) -> list:
    """`count` items spread evenly over `items` (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)] if count > 1 else [items[0]]
