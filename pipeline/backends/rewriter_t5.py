"""Local CATE rewriter: a T5 checkpoint (e.g. google/flan-t5-large) turns D_init + emotion descriptors into D_final.

    rewriter = T5Rewriter("google/flan-t5-large", device="cuda")  # once per worker
    finals = rewriter.rewrite_batch(prompts)                       # one rewritten text per prompt

The prompt text is built by the `cate` stage; this backend only encodes, generates (greedy, or beam search with
`num_beams`) and decodes.
"""
from __future__ import annotations

from typing import Any, Sequence

from .captioner_hf import torch_dtype
from .checkpoints import checkpoint_identity


class T5Rewriter:
    name = "t5"

    def __init__(self, model: str, *, device: str = "cpu", max_new_tokens: int = 128, num_beams: int = 1,
                 max_input_tokens: int = 512, batch_size: int = 16, dtype: str = "auto",
                 revision: str | None = None):
        import transformers

        if min(max_new_tokens, num_beams, max_input_tokens, batch_size) < 1:
            raise ValueError("max_new_tokens, num_beams, max_input_tokens and batch_size must be at least 1")
        config = transformers.AutoConfig.from_pretrained(model, revision=revision)
        if config.model_type != "t5":
            raise ValueError(f"{model!r} is a {config.model_type!r} checkpoint; the t5 rewriter needs a T5 one")
        self.model = transformers.T5ForConditionalGeneration.from_pretrained(
            model, revision=revision, dtype=torch_dtype(dtype), device_map=device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model, revision=revision)
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        self.max_input_tokens, self.batch_size = max_input_tokens, batch_size
        self.identity = self.describe(model, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                      max_input_tokens=max_input_tokens, dtype=dtype, revision=revision)

    @staticmethod
    def describe(model: str, *, max_new_tokens: int = 128, num_beams: int = 1, max_input_tokens: int = 512,
                 dtype: str = "auto", revision: str | None = None) -> dict[str, Any]:
        """The `identity` a rewriter built with these arguments has, found without loading the weights."""
        torch_dtype(dtype)  # the same error as the constructor for an unknown name
        return {"backend": T5Rewriter.name, **checkpoint_identity(model, revision), "max_new_tokens": max_new_tokens,
                "num_beams": num_beams, "max_input_tokens": max_input_tokens, "dtype": dtype}

    def rewrite_batch(self, prompts: Sequence[str]) -> list[str]:
        """One rewritten text per prompt, stripped; prompts longer than `max_input_tokens` are truncated."""
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i}: expected text, got {type(prompt).__name__}")
        outputs: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            outputs += self._generate(list(prompts[start:start + self.batch_size]))
        return outputs

    def _generate(self, prompts: list[str]) -> list[str]:
        import torch

        inputs = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_input_tokens,
                                return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                         do_sample=False)
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
