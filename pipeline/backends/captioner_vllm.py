"""Offline vLLM captioner: the same interface as the transformers one, on vLLM's batched GPU engine.

    captioner = VLLMCaptioner("llava-hf/LLaVA-NeXT-Video-7B-hf")  # once per GPU worker (CUDA_VISIBLE_DEVICES)
    captions = captioner.caption_batch(clips, prompt)

vLLM is an optional, GPU-only extra, imported when this backend is built. It runs LLaVA-NeXT-Video and Qwen2-VL /
Qwen2.5-VL; it has no Video-LLaVA implementation (use the hf backend, or Video-LLaVA behind another server). vLLM
prepares the frames itself with the checkpoint's HF processor and expands the one video placeholder of the prompt.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .captioner_hf import DTYPES, PROMPT_TEMPLATES, check_clip, subsample
from .checkpoints import checkpoint_identity

# vLLM takes a video as a (T, H, W, 3) uint8 array for these; newer families (Qwen3-VL, GLM-4.1V) would also need
# the video's metadata, so they are left out rather than fed guessed timestamps.
VLLM_PROMPT_TEMPLATES = {
    "llava_next_video": PROMPT_TEMPLATES["llava_next_video"],
    "qwen2_vl": PROMPT_TEMPLATES["qwen2_vl"],
    "qwen2_5_vl": PROMPT_TEMPLATES["qwen2_vl"],
}


_MISSING = "the 'vllm' captioner needs vLLM, a GPU-only extra: pip install 'affectprep[gpu]'"


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ImportError(_MISSING) from error
    return vllm


class VLLMCaptioner:
    """A video LLM in an offline `vllm.LLM`, loaded once; greedy decoding (temperature 0)."""

    name = "vllm"

    def __init__(self, model: str, *, device: str = "cuda", dtype: str = "auto", max_new_tokens: int = 128,
                 num_frames: int = 8, revision: str | None = None, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1):
        vllm = import_vllm()
        if device != "cuda":
            raise ValueError(f"vLLM runs on 'cuda' only, got device {device!r}; pick GPUs with CUDA_VISIBLE_DEVICES")
        if num_frames < 1 or max_new_tokens < 1:
            raise ValueError("num_frames and max_new_tokens must be at least 1")
        self.identity = self.describe(model, dtype=dtype, max_new_tokens=max_new_tokens, num_frames=num_frames,
                                      revision=revision)
        self.family, self.num_frames = self.identity["family"], num_frames
        self.llm = vllm.LLM(model=model, revision=revision, dtype=dtype, seed=0,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            tensor_parallel_size=tensor_parallel_size, limit_mm_per_prompt={"video": 1})
        self.sampling = vllm.SamplingParams(temperature=0, max_tokens=max_new_tokens)

    @staticmethod
    def describe(model: str, *, dtype: str = "auto", max_new_tokens: int = 128, num_frames: int = 8,
                 revision: str | None = None) -> dict[str, Any]:
        """The `identity` a captioner built with these arguments has, found without starting vLLM."""
        from importlib.metadata import PackageNotFoundError, version

        from transformers import AutoConfig

        try:
            vllm_version = version("vllm")
        except PackageNotFoundError as error:
            raise ImportError(_MISSING) from error
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
        family = AutoConfig.from_pretrained(model, revision=revision).model_type
        if family not in VLLM_PROMPT_TEMPLATES:
            raise ValueError(f"{model!r} is a {family!r} checkpoint; the vllm captioner runs "
                             f"{sorted(VLLM_PROMPT_TEMPLATES)} (Video-LLaVA: use the hf captioner)")
        return {"backend": VLLMCaptioner.name, **checkpoint_identity(model, revision), "family": family,
                "vllm": vllm_version, "num_frames": num_frames, "max_new_tokens": max_new_tokens, "dtype": dtype}

    def caption_batch(self, clips: Sequence[np.ndarray], prompt: str) -> list[str]:
        """One caption per clip, stripped; vLLM schedules the whole list itself."""
        videos = [subsample(check_clip(clip, i), self.num_frames) for i, clip in enumerate(clips)]
        if not videos:
            return []
        text = VLLM_PROMPT_TEMPLATES[self.family].format(prompt=prompt)
        requests = [{"prompt": text, "multi_modal_data": {"video": video}} for video in videos]
        outputs = self.llm.generate(requests, sampling_params=self.sampling, use_tqdm=False)
        return [output.outputs[0].text.strip() for output in outputs]
