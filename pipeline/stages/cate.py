"""`cate`: CATE rewriting, D_final = rewrite(D_init + the "an emotion of <class>" phrases of the top-k), as in
GRACE (III-B). Backends: openai:<model> (GPT-4o-mini by default; any OpenAI-compatible server), t5:<path-or-id>,
and `template` (concatenation only: the paper's no-LLM ablation).

GRACE's Table IV ablations, each a text version of its own (the switches are config values, so in the key):
`descriptor_phrases = false` ("w/o emotion-descriptor phrase") gives the rewriter the top-k as bare class names
(cate/rewrite_labels_v1.txt), without the "an emotion of [class]" phrases; `label_guidance = false` ("w/o Top-3
labels guidance") gives it no predicted emotions at all, only the caption (cate/rewrite_unguided_v1.txt). With
the template backend the latter copies the initial caption unchanged: Table II's rows without CATE."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .. import facs
from ..backends.llm import ChatRequest, user_message
from ..stage import Stage, failed_row, file_digest
from .text_backends import (OPERATIONAL, chat_client, keyed_text_config, offline_row, parse_backend, prompt_file,
                            prompt_identity, text_row)

BACKENDS = ("openai", "t5", "template")
IN_FOLD = ("refused: the top-k emotions of this sample come from a model that trained on its label (in-fold), "
           "so text built from them would leak the label; use out-of-fold predictions, or set "
           "cate.allow_in_fold = true to accept the leak")


@dataclass(frozen=True)
class CateConfig:
    llm: str = "openai:gpt-4o-mini"  # openai:<model> | t5:<path-or-id> | template
    base_url: str | None = None      # an OpenAI-compatible server (vLLM, ...); default OpenAI
    prompt: str = "cate/rewrite_v1.txt"
    top_k: int = 3
    descriptor_phrases: bool = True  # False: the top-k as bare class names (Table IV "w/o emotion-descriptor phrase")
    label_guidance: bool = True      # False: no top-k at all, the caption alone (Table IV "w/o Top-3 labels guidance")
    max_tokens: int = 256
    temperature: float = 0.0
    concurrency: int = 16
    timeout: float = 60.0
    max_retries: int = 6
    device: str = "cpu"              # t5
    allow_in_fold: bool = False      # accept predictions from a model that saw the sample's label
    prices: dict[str, list[float]] = field(default_factory=dict)   # model -> [USD per 1M input, per 1M output]


class CateStage(Stage):
    name = "cate"
    version = 1
    Config = CateConfig
    operational = OPERATIONAL
    reads = {"captions": ("caption",), "emotions": ("top_names", "top_probs", "in_fold")}
    media_kinds = frozenset({"video", "frames", "image"})
    needs_label = True
    batch_size = 64

    def __init__(self, config: CateConfig):
        super().__init__(config)
        self.kind, self.model = parse_backend(config.llm, BACKENDS, "cate.llm")

    def keyed_config(self) -> dict[str, Any]:
        return keyed_text_config(super().keyed_config(), self.kind)

    def identity(self) -> dict[str, Any]:
        # The descriptor phrases come from the FACS tables, so their files are part of the key.
        ident: dict[str, Any] = {"llm": self.config.llm, **{p.name: file_digest(p) for p in facs.source_files()}}
        if self.kind != "template":
            ident.update(prompt_identity(self.prompt_name))
        if self.kind == "t5":
            from ..backends.rewriter_t5 import T5Rewriter
            ident["model"] = T5Rewriter.describe(self.model, max_new_tokens=self.config.max_tokens)
        return ident

    def runs_in_client(self) -> bool:
        return self.kind in ("openai", "template")

    def setup(self) -> None:
        c = self.config
        if self.kind == "openai":
            self.backend = chat_client(c, self.context)
        elif self.kind == "t5":
            from ..backends.rewriter_t5 import T5Rewriter
            self.backend = T5Rewriter(self.model, device=c.device, max_new_tokens=c.max_tokens)

    def guidance(self, row: dict[str, Any]) -> list[str]:
        """The top-k emotions as the rewriter gets them: emotion-descriptor phrases, bare class names, or none."""
        if not self.config.label_guidance:
            return []
        top = row["top_names"][: self.config.top_k]
        if not self.config.descriptor_phrases:
            return list(top)
        return [facs.descriptor(self.context["label_set"], name) for name in top]

    def descriptors(self, row: dict[str, Any]) -> list[str]:
        return [f"{g} (p = {p:.2f})" for g, p in zip(self.guidance(row), row["top_probs"])]

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        refused = {row["sample_id"] for row in rows if row["in_fold"] and not self.config.allow_in_fold}
        todo = [row for row in rows if row["sample_id"] not in refused]
        if self.kind == "openai":
            done = self.rows_from_answers(todo, self.backend.complete_many(self.requests(todo)))
        elif self.kind == "t5":
            try:
                texts = self.backend.rewrite_batch([self.prompt(row) for row in todo])
            except Exception as e:  # noqa: BLE001 - recorded on the batch's samples
                texts = [e] * len(todo)
            done = [self._t5_row(row, text) for row, text in zip(todo, texts)]
        else:
            done = [self._template_row(row) for row in todo]
        out = {row["sample_id"]: row for row in done}
        return [failed_row(row["sample_id"], IN_FOLD) if row["sample_id"] in refused else out[row["sample_id"]]
                for row in rows]

    @property
    def prompt_name(self) -> str:
        """The template the switches ask for: `prompt` for full CATE, else the ablation's own template."""
        if not self.config.label_guidance:
            return "cate/rewrite_unguided_v1.txt"
        return self.config.prompt if self.config.descriptor_phrases else "cate/rewrite_labels_v1.txt"

    @cached_property
    def template(self) -> str:
        return prompt_file(self.prompt_name).read_text()

    def prompt(self, row: dict[str, Any]) -> str:
        listed = "\n".join(f"- {p}" for p in self.descriptors(row))
        return self.template.format(caption=row["caption"], descriptors=listed).strip()

    def requests(self, rows: list[dict[str, Any]]) -> list[ChatRequest]:
        """The chat requests of `rows` (openai:<model>), also what a Batch API export writes."""
        c = self.config
        return [ChatRequest(self.model, (user_message(self.prompt(row)),), max_tokens=c.max_tokens,
                            temperature=c.temperature) for row in rows]

    def rows_from_answers(self, rows: list[dict[str, Any]], answers: list) -> list[dict[str, Any]]:
        return [text_row(row["sample_id"], answer, "text", "openai", self.model, **self._sources(row))
                for row, answer in zip(rows, answers)]

    def _sources(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"caption": row["caption"], "descriptors": self.descriptors(row)}

    def _t5_row(self, row: dict[str, Any], text: str | Exception) -> dict[str, Any]:
        sid = row["sample_id"]
        if isinstance(text, Exception):
            return failed_row(sid, f"t5 rewriter failed: {type(text).__name__}: {text}")
        if not text.strip():
            return failed_row(sid, "empty answer")
        return offline_row(sid, "text", text.strip(), "t5", self.model, **self._sources(row))

    def _template_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Concatenation only: the caption, then the guidance (GRACE's no-LLM ablation); without label guidance,
        the caption unchanged."""
        words = self.guidance(row)
        text = f"{row['caption'].rstrip()} {', '.join(words)}." if words else row["caption"]
        return offline_row(row["sample_id"], "text", text, "template", "", **self._sources(row))
