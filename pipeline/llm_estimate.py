"""What an LLM run will send, before it sends anything: per openai:<model> text stage, the number of requests, an
estimate of their prompt tokens, the most completion tokens they may use, and the cost at the price table, online
and at the Batch API rate. `run --dry-run` and `text export-batch --dry-run` print it and stop.

The counts are estimates, not the server's tokenizer (there is none offline): text at OpenAI's rule of thumb of
4 characters a token plus each message's framing, images by OpenAI's published rules (512-pixel tiles for
GPT-4o and GPT-4.1, 32-pixel patches for GPT-4.1 mini / nano). The requests themselves are the stage's own: built
from up to SAMPLED ready samples and extrapolated; a sample whose inputs are not made yet (its captions, say) is
counted at a stand-in request of the same shape, the caption at the captions stage's max_tokens. Completions are
counted at max_tokens, so the cost is an upper bound; answers already in the response cache cost nothing."""
from __future__ import annotations

import base64
import io
import math
import os
from dataclasses import dataclass
from itertools import islice
from typing import Any

from pathlib import Path

from PIL import Image

from affectprep.config import ProjectConfig

from .backends.llm import DEFAULT_PRICES, OPENAI_BASE_URL, ChatRequest, price_for
from .backends.llm_cache import ResponseCache
from .backends.llm_batch import BATCH_PRICE_FACTOR
from .dag import DatasetPlan, StagePlan, dataset_names, ensure_index, joined_rows

SAMPLED = 32               # ready samples whose real requests are built and measured per stage
CHARS_PER_TOKEN = 4        # OpenAI's rule of thumb for English text
MESSAGE_TOKENS = 4         # the chat framing of each message, and 3 more priming the reply
REPLY_TOKENS = 3

# Image tokens at detail "auto" (high for a crop this size): (base, per 512-px tile) after fitting the image in
# 2048 x 2048 and its short side in 768; GPT-4o mini bills ~33x the tokens at a ~33x lower price.
_TILES = {"gpt-4o-mini": (2833, 5667), "gpt-4o": (85, 170), "gpt-4.1": (85, 170)}
# (multiplier) for the models billed per 32-px patch, at most 1536 patches.
_PATCHES = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46}


def image_tokens(model: str, width: int, height: int) -> int:
    patch = price_for(model, {k: (v, v) for k, v in _PATCHES.items()})
    if patch is not None:
        patches = min(1536, math.ceil(width / 32) * math.ceil(height / 32))
        return math.ceil(patches * patch[0])
    base, tile = price_for(model, _TILES) or (85, 170)
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return base + tile * math.ceil(w / 512) * math.ceil(h / 512)


def _image_size(part: dict[str, Any]) -> tuple[int, int]:
    url = part.get("image_url", {}).get("url", "")
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))) as image:
            return image.size
    except (IndexError, ValueError, OSError):
        return (512, 512)


def prompt_tokens(request: ChatRequest) -> int:
    total = REPLY_TOKENS
    for message in request.messages:
        total += MESSAGE_TOKENS
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part.get("type") == "text":
                total += math.ceil(len(part.get("text", "")) / CHARS_PER_TOKEN)
            elif part.get("type") == "image_url":
                total += image_tokens(request.model, *_image_size(part))
    return total


@dataclass
class Estimate:
    dataset: str
    stage: str                 # "cate[fold 2]"
    backend: str
    requests: int              # to send: the response cache answers the others for free
    prompt_tokens: int
    completion_tokens: int     # at most: max_tokens per request
    priced: bool
    cost_online: float         # at most, completions at max_tokens
    cost_batch: float
    cached: int = 0            # requests the response cache already answers (not in `requests`)

    def line(self) -> str:
        cost = (f"cost <= ${self.cost_online:,.4f} online, ${self.cost_batch:,.4f} batch" if self.priced
                else "no price for this model (add it to the stage's prices)")
        cached = f" (and {self.cached} the response cache answers, free)" if self.cached else ""
        return (f"{self.dataset} {self.stage} ({self.backend}): {self.requests} request(s){cached}, "
                f"~{self.prompt_tokens:,} prompt tokens, <= {self.completion_tokens:,} completion tokens; {cost}")


def _in_response_cache(stage_plan: StagePlan, requests: list[ChatRequest]) -> list[bool]:
    """Which requests the shared response cache already answers (the client's own cache and keys)."""
    cache = stage_plan.stage.context.get("cache")
    folder = Path(cache) / "llm_responses" if cache else None
    if folder is None or not folder.is_dir():
        return [False] * len(requests)
    base_url = (stage_plan.stage.config.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    found = ResponseCache(folder).get_many(r.key(base_url) for r in requests)
    return [r.key(base_url) in found for r in requests]


def estimate(dataset: str, stage_plan: StagePlan, count: int, measured: list[ChatRequest],
             stand_in: ChatRequest | None, live: bool = True) -> Estimate:
    """`count` requests, `measured` of them built for real; the rest at their mean (or at `stand_in`). For a
    `live` run, the share of the measured ones the response cache answers is taken as the share of all (a Batch
    API file holds every request)."""
    stage = stage_plan.stage
    hits = _in_response_cache(stage_plan, measured) if live else [False] * len(measured)
    cached = round(count * sum(hits) / len(measured)) if measured else 0
    to_send = [r for r, hit in zip(measured, hits) if not hit]
    tokens = sum(map(prompt_tokens, to_send))
    rest = count - cached - len(to_send)
    if rest > 0:
        mean = (tokens / len(to_send) if to_send else sum(map(prompt_tokens, measured)) / len(measured)
                if measured else prompt_tokens(stand_in) if stand_in else 0)
        tokens += round(mean * rest)
    count -= cached
    completion = count * stage.config.max_tokens
    prices = {**DEFAULT_PRICES, **{m: tuple(p) for m, p in (stage.config.prices or {}).items()}}
    price = price_for(stage.model, prices)
    online = (tokens * price[0] + completion * price[1]) / 1e6 if price else 0.0
    backend = getattr(stage.config, "captioner", None) or getattr(stage.config, "llm", "")
    return Estimate(dataset, stage_plan.name, backend, count, tokens, completion, price is not None, online,
                    online * BATCH_PRICE_FACTOR, cached)


def estimate_rows(dataset: str, stage_plan: StagePlan, rows: list[dict[str, Any]]) -> Estimate:
    """The estimate of the requests of these joined rows (what an export writes)."""
    sample = rows[:SAMPLED]
    return estimate(dataset, stage_plan, len(rows), stage_plan.stage.requests(sample), None, live=False)


def estimate_run(project: ProjectConfig, target: str | None, datasets: list[str] | None, limit: int | None = None,
                 retry_failed: bool = False) -> list[Estimate]:
    """What `run` would send: for each openai:<model> text stage, the samples it would do."""
    out = []
    for name in dataset_names(project, datasets):
        ds = project.datasets[name]
        plan = DatasetPlan(project, ds, ensure_index(project, ds), target)
        population = plan.population(limit)
        for stage_plan in plan.stages:
            if getattr(stage_plan.stage, "kind", None) != "openai":
                continue
            done = plan.done(stage_plan, population, retry_failed)
            todo = [sid for sid in plan.applicable(stage_plan, population) if sid not in done]
            ready = [sid for sid in todo if plan.upstream_ok(stage_plan, sid)]
            rows = list(islice(joined_rows(plan, stage_plan, ready[:SAMPLED], set(ready[:SAMPLED])), SAMPLED))
            measured = stage_plan.stage.requests(rows) if rows else []
            stand_in = None if measured else _stand_in(plan, stage_plan)
            out.append(estimate(name, stage_plan, len(todo), measured, stand_in))
    return out


def _stand_in(plan: DatasetPlan, stage_plan: StagePlan) -> ChatRequest | None:
    """A request of the shape the stage will send, for samples whose inputs are not made yet."""
    stage = stage_plan.stage
    if stage.name == "captions":
        faces = plan.by_name.get("faces")
        size = faces.stage.config.size if faces is not None else 224
        jpeg = io.BytesIO()
        Image.new("RGB", (size, size)).save(jpeg, format="JPEG")
        n = stage.config.num_frames
        return stage.requests([{"crops": [jpeg.getvalue()] * n, "frames_per_view": n}])[0]
    if stage.name == "cate":
        captions = next((p for p in plan.stages if p.stage.name == "captions"), None)
        words = captions.stage.config.max_tokens if captions is not None else 256
        names = list(stage.context.get("label_names") or [])[: stage.config.top_k]
        row = {"caption": " ".join(["word"] * words), "top_names": names, "top_probs": [0.5] * len(names)}
        try:
            return stage.requests([row])[0]
        except (KeyError, ValueError):
            return None
    return None


def any_llm_stage(project: ProjectConfig) -> bool:
    """Whether the project's text stages name an openai:<model> backend anywhere (top-level or per dataset)."""
    tables = [project.stages, *(ds.stages for ds in project.datasets.values())]
    return any(str(t.get(stage, {}).get(option, "")).startswith("openai:")
               for t in tables for stage, option in (("captions", "captioner"), ("cate", "llm")))

