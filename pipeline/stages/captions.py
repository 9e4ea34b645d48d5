"""`captions`: describe the facial movements of each clip's aligned frames (GRACE's D_init), in FACS terms."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..backends.llm import ChatRequest, user_message
from ..stage import Stage, failed_row
from .text_backends import (OPERATIONAL, chat_client, decode_crops, evenly, keyed_text_config, offline_row,
                            parse_backend, prompt_file, prompt_identity, text_row)

BACKENDS = ("motion", "openai", "hf", "vllm")


@dataclass(frozen=True)
class CaptionsConfig:
    captioner: str = "motion"        # motion | openai:<model> | hf:<path-or-id> | vllm:<path-or-id>
    base_url: str | None = None      # an OpenAI-compatible server for openai:<model>, e.g. vLLM's; default OpenAI
    prompt: str = "captions/facs_v1.txt"
    num_frames: int = 8              # aligned frames of the first view shown to a video LLM
    max_tokens: int = 256
    temperature: float = 0.0
    concurrency: int = 16            # requests in flight per worker (openai)
    timeout: float = 60.0
    max_retries: int = 6
    device: str = "cpu"              # hf / vllm
    prices: dict[str, list[float]] = field(default_factory=dict)   # model -> [USD per 1M input, per 1M output]


class CaptionsStage(Stage):
    name = "captions"
    version = 1
    Config = CaptionsConfig
    operational = OPERATIONAL
    reads = {"faces": ("crops", "landmarks", "frames_per_view")}
    media_kinds = frozenset({"video", "frames", "image"})
    batch_size = 32   # one task sends this many requests at once, so a worker keeps its connections busy

    def __init__(self, config: CaptionsConfig):
        super().__init__(config)
        self.kind, self.model = parse_backend(config.captioner, BACKENDS, "captions.captioner")

    def keyed_config(self) -> dict[str, Any]:
        return keyed_text_config(super().keyed_config(), self.kind)

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"captioner": self.config.captioner}
        if self.kind == "motion":
            from ..backends.captioner_motion import MotionCaptioner
            return {**ident, **MotionCaptioner().identity}
        ident.update(prompt_identity(self.config.prompt))
        if self.kind == "hf":
            from ..backends.captioner_hf import HFVideoCaptioner
            ident["model"] = HFVideoCaptioner.describe(self.model, dtype="auto", max_new_tokens=self.config.max_tokens,
                                                       num_frames=self.config.num_frames, revision=None)
        elif self.kind == "vllm":
            from ..backends.captioner_vllm import VLLMCaptioner
            ident["model"] = VLLMCaptioner.describe(self.model, dtype="auto", max_new_tokens=self.config.max_tokens,
                                                    num_frames=self.config.num_frames, revision=None)
        return ident

    def runs_in_client(self) -> bool:
        return self.kind == "openai"

    def setup(self) -> None:
        c = self.config
        if self.kind == "motion":
            import cv2
            from ..backends.captioner_motion import MotionCaptioner
            cv2.setNumThreads(1)  # one worker process per core already
            self.backend = MotionCaptioner()
        elif self.kind == "openai":
            self.backend = chat_client(c, self.context)
        elif self.kind == "hf":
            from ..backends.captioner_hf import HFVideoCaptioner
            self.backend = HFVideoCaptioner(self.model, device=c.device, max_new_tokens=c.max_tokens,
                                            num_frames=c.num_frames)
        else:
            from ..backends.captioner_vllm import VLLMCaptioner
            self.backend = VLLMCaptioner(self.model, device=c.device, max_new_tokens=c.max_tokens,
                                         num_frames=c.num_frames)

    @cached_property
    def prompt(self) -> str:
        return prompt_file(self.config.prompt).read_text().format(num_frames=self.config.num_frames).strip()

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.kind == "motion":
            return [self.process_guarded(row) for row in rows]
        if self.kind == "openai":
            return self.rows_from_answers(rows, self.backend.complete_many(self.requests(rows)))
        first_views = [row["crops"][: row["frames_per_view"]] for row in rows]
        clips = [decode_crops(crops) for crops in first_views]
        try:
            texts = self.backend.caption_batch(clips, self.prompt)
        except Exception as e:  # noqa: BLE001 - a model error is recorded on the samples of this batch
            return [failed_row(row["sample_id"], f"{self.kind} captioner failed: {type(e).__name__}: {e}")
                    for row in rows]
        return [offline_row(row["sample_id"], "caption", t.strip(), self.kind, self.model) if t.strip()
                else failed_row(row["sample_id"], "empty caption") for row, t in zip(rows, texts)]

    def requests(self, rows: list[dict[str, Any]]) -> list[ChatRequest]:
        """The chat requests of `rows` (openai:<model>), also what a Batch API export writes."""
        c = self.config
        return [ChatRequest(self.model, (user_message(self.prompt, evenly(row["crops"][: row["frames_per_view"]],
                                                                          c.num_frames)),),
                            max_tokens=c.max_tokens, temperature=c.temperature) for row in rows]

    def rows_from_answers(self, rows: list[dict[str, Any]], answers: list) -> list[dict[str, Any]]:
        return [text_row(row["sample_id"], a, "caption", "openai", self.model) for row, a in zip(rows, answers)]

    def process_one(self, row: dict[str, Any]) -> dict[str, Any]:
        n = row["frames_per_view"]
        landmarks = np.asarray(row["landmarks"][:n], np.float32).reshape(n, -1, 2)
        text = self.backend.caption(row["crops"][:n], landmarks, n)
        return {k: v for k, v in offline_row(row["sample_id"], "caption", text, "motion", "").items()
                if k not in ("sample_id", "status", "error")}
