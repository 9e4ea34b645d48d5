"""Local video-LLM captioner on transformers (GRACE's D_init): Video-LLaVA, LLaVA-NeXT-Video or Qwen2-VL.

    captioner = HFVideoCaptioner("LanguageBind/Video-LLaVA-7B-hf", device="cuda")  # once per worker
    captions = captioner.caption_batch(clips, prompt)  # clips: (T, H, W, 3) uint8 RGB; greedy decoding

The family comes from the checkpoint's `model_type`. HF video processors need torchvision: where it is installed and
the checkpoint ships a processor, the processor prepares frames and expands the video placeholder. Otherwise this
module does the same steps itself from the checkpoint's processor config: uniform frame subsampling, bicubic resize
(and centre crop), rescale and normalise with the checkpoint's mean/std, Qwen2-VL's patchification, and the
placeholder repeated as many times as the model emits visual tokens. The path taken is part of `identity`.

`torch_dtype` is shared with the vLLM captioner and the T5 rewriter.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .checkpoints import checkpoint_identity

# Prompt formats of the reference checkpoints (their model cards and vLLM's examples), with the one video placeholder
# the processor (or vLLM) expands.
PROMPT_TEMPLATES = {
    "video_llava": "USER: <video>\n{prompt} ASSISTANT:",
    "llava_next_video": "USER: <video>\n{prompt} ASSISTANT:",
    "qwen2_vl": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{prompt}<|im_end|>\n"
                 "<|im_start|>assistant\n"),
}
MODEL_CLASSES = {
    "video_llava": "VideoLlavaForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")

# Defaults of the transformers video processors (VideoLlavaVideoProcessor, LlavaNextVideoVideoProcessor,
# Qwen2VLVideoProcessor), which the checkpoint's processor config overrides.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_QWEN_MIN_PIXELS, _QWEN_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28


class HFVideoCaptioner:
    """A video LLM loaded once through transformers; `caption_batch` describes each clip, greedily decoded."""

    name = "hf"

    def __init__(self, model: str, *, device: str = "cpu", dtype: str = "auto", max_new_tokens: int = 128,
                 num_frames: int = 8, revision: str | None = None, batch_size: int = 8):
        import transformers

        if num_frames < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("num_frames, max_new_tokens and batch_size must be at least 1")
        self.family = _family(model, revision)
        self.max_new_tokens, self.num_frames, self.batch_size = max_new_tokens, num_frames, batch_size
        model_class = getattr(transformers, MODEL_CLASSES[self.family])
        self.model = model_class.from_pretrained(model, revision=revision, dtype=torch_dtype(dtype),
                                                 device_map=device).eval()
        self.processor = _video_processor(model, revision)
        self.tokenizer = self.processor.tokenizer if self.processor is not None else \
            transformers.AutoTokenizer.from_pretrained(model, revision=revision)
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the last prompt token
        self.pad_id = _pad_token_id(self.tokenizer, self.model)
        self.frames = None if self.processor is not None else \
            FramePreparation.from_settings(self.family, self.model.config, _video_settings(model, revision))
        self.identity = _identity(model, revision, self.family, self.processor is not None, dtype=dtype,
                                  num_frames=num_frames, max_new_tokens=max_new_tokens)

    @staticmethod
    def describe(model: str, *, dtype: str = "auto", max_new_tokens: int = 128, num_frames: int = 8,
                 revision: str | None = None) -> dict[str, Any]:
        """The `identity` a captioner built with these arguments has, found without loading the weights (for cache
        keys computed where the model is not run)."""
        torch_dtype(dtype)  # the same error as the constructor for an unknown name
        return _identity(model, revision, _family(model, revision), _video_processor(model, revision) is not None,
                         dtype=dtype, num_frames=num_frames, max_new_tokens=max_new_tokens)

    def caption_batch(self, clips: Sequence[np.ndarray], prompt: str) -> list[str]:
        """One caption per clip: the generated continuation only, stripped. Clips are (T, H, W, 3) uint8 RGB."""
        clips = [subsample(check_clip(clip, i), self.num_frames) for i, clip in enumerate(clips)]
        text = PROMPT_TEMPLATES[self.family].format(prompt=prompt)
        captions: list[str] = [""] * len(clips)
        # Clips of one size prepare to one tensor shape and one prompt length, so they batch together.
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, clip in enumerate(clips):
            by_shape.setdefault(clip.shape, []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for i, caption in zip(chunk, self._generate([clips[i] for i in chunk], text)):
                    captions[i] = caption
        return captions

    def _generate(self, clips: list[np.ndarray], text: str) -> list[str]:
        import torch

        if self.processor is not None:
            inputs = dict(self.processor(text=[text] * len(clips), videos=clips, padding=True, return_tensors="pt"))
        else:
            inputs = self._inputs(clips, text)
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                         pad_token_id=self.pad_id)
        continuation = output[:, inputs["input_ids"].shape[1]:]
        return [caption.strip() for caption in self.tokenizer.batch_decode(continuation, skip_special_tokens=True)]

    def _inputs(self, clips: list[np.ndarray], text: str) -> dict[str, Any]:
        """Model inputs without the HF processor: prepared frames and the prompt with its placeholder expanded."""
        import torch

        video_id = self.model.config.video_token_id
        ids = self.tokenizer(text).input_ids
        if ids.count(video_id) != 1:
            raise ValueError(f"the tokenizer does not encode the video placeholder of {text!r} as the model's video "
                             f"token {video_id}")
        at = ids.index(video_id)
        prepared = [self.frames(clip) for clip in clips]
        # Clips of one shape give one number of visual tokens, so the rows need no padding.
        input_ids = torch.tensor([ids[:at] + [video_id] * clip.num_tokens + ids[at + 1:] for clip in prepared])
        attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.family == "qwen2_vl":
            inputs["pixel_values_videos"] = torch.from_numpy(np.concatenate([clip.pixels for clip in prepared]))
            inputs["video_grid_thw"] = torch.tensor([clip.grid for clip in prepared])
            # Multimodal RoPE tells text (0) from video (2) tokens by these.
            inputs["mm_token_type_ids"] = (input_ids == video_id).long() * 2
        else:
            inputs["pixel_values_videos"] = torch.from_numpy(np.stack([clip.pixels for clip in prepared]))
        return inputs


@dataclass(frozen=True)
class PreparedClip:
    pixels: np.ndarray                      # LLaVA families (T, 3, h, w); Qwen2-VL (patches, 3 * tp * p * p)
    num_tokens: int                         # visual tokens the model emits for it: copies of the placeholder
    grid: tuple[int, int, int] | None       # Qwen2-VL's (temporal, height, width) patch grid


@dataclass(frozen=True)
class FramePreparation:
    """What a checkpoint's video processor does to frames, done with numpy and PIL (no torchvision).

    Calling it on a (T, H, W, 3) uint8 clip gives the model's `pixel_values_videos` for that clip and the number of
    visual tokens the model will emit for it.
    """

    family: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float
    size: dict[str, int]                   # {"shortest_edge"} or {"height", "width"}; Qwen2-VL: min/max pixels
    crop: tuple[int, int] | None           # (height, width) centre crop, LLaVA families
    patch: int
    merge: int = 1                          # Qwen2-VL spatial merge
    temporal_patch: int = 1                 # Qwen2-VL frames per temporal patch
    pool_stride: int = 1                    # LLaVA-NeXT-Video spatial pooling
    extra_tokens: int = 0                   # Video-LLaVA keeps each frame's CLS token

    @classmethod
    def from_settings(cls, family: str, config: Any, settings: dict[str, Any]) -> FramePreparation:
        vision = config.vision_config
        common = {"family": family, "mean": tuple(settings.get("image_mean", _CLIP_MEAN)),
                  "std": tuple(settings.get("image_std", _CLIP_STD)),
                  "rescale": float(settings.get("rescale_factor", 1 / 255))}
        if family == "qwen2_vl":
            size = settings.get("size") or {}
            # Older Qwen2-VL configs give the pixel range as min_pixels/max_pixels, which win (as in transformers).
            low = settings.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or _QWEN_MIN_PIXELS
            high = settings.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or _QWEN_MAX_PIXELS
            return cls(**common, size={"shortest_edge": low, "longest_edge": high}, crop=None, patch=vision.patch_size,
                       merge=vision.spatial_merge_size, temporal_patch=vision.temporal_patch_size)
        side = vision.image_size  # without a processor config, frames go in at the vision tower's own size
        size = settings.get("size") or {"shortest_edge": side}
        crop = settings.get("crop_size") or {"height": side, "width": side}
        crop_box = (crop["height"], crop["width"]) if settings.get("do_center_crop", True) else None
        if family == "video_llava":
            return cls(**common, size=size, crop=crop_box, patch=vision.patch_size, extra_tokens=1)
        return cls(**common, size=size, crop=crop_box, patch=vision.patch_size, pool_stride=config.spatial_pool_stride)

    def __call__(self, clip: np.ndarray) -> PreparedClip:
        height, width = self.resized_size(clip.shape[1], clip.shape[2])
        frames = np.stack([_resize(frame, height, width) for frame in clip])
        if self.crop is not None:
            top, left = (height - self.crop[0]) // 2, (width - self.crop[1]) // 2
            frames = frames[:, top:top + self.crop[0], left:left + self.crop[1]]
        pixels = (frames.astype(np.float32) * self.rescale - np.float32(self.mean)) / np.float32(self.std)
        pixels = pixels.transpose(0, 3, 1, 2)  # (T, 3, h, w)
        if self.family == "qwen2_vl":
            return self._patchify(pixels)
        h, w = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
        per_frame = (h // self.pool_stride) * (w // self.pool_stride) + self.extra_tokens
        return PreparedClip(np.ascontiguousarray(pixels), len(pixels) * per_frame, None)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.family == "qwen2_vl":
            return qwen_smart_resize(height, width, self.patch * self.merge, self.size["shortest_edge"],
                                     self.size["longest_edge"])
        if "shortest_edge" in self.size:
            short, long = sorted((height, width))
            target_short, target_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
            return (target_short, target_long) if height <= width else (target_long, target_short)
        return self.size["height"], self.size["width"]

    def _patchify(self, pixels: np.ndarray) -> PreparedClip:
        # As Qwen2VLVideoProcessor.patchify: pad time with the last frame, then flatten each temporal x spatial patch
        # in merge-window order.
        t, p, m, tp = len(pixels), self.patch, self.merge, self.temporal_patch
        if pad := -t % tp:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        grid_t, channels = len(pixels) // tp, pixels.shape[1]
        grid_h, grid_w = pixels.shape[2] // p, pixels.shape[3] // p
        patches = pixels.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        patches = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
        num_tokens = grid_t * grid_h * grid_w // (m * m)
        return PreparedClip(np.ascontiguousarray(patches), num_tokens, (grid_t, grid_h, grid_w))


def qwen_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a {width}x{height} frame is too elongated for Qwen2-VL (aspect ratio above 200)")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_clip(clip: Any, index: int = 0) -> np.ndarray:
    """The clip as a (T, H, W, 3) uint8 array, or a ValueError that says what is wrong with it."""
    array = np.asarray(clip)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape:
        raise ValueError(f"clip {index}: expected (frames, height, width, 3) uint8 RGB frames, got shape "
                         f"{array.shape} of {array.dtype}")
    return array


def subsample(clip: np.ndarray, num_frames: int) -> np.ndarray:
    """`num_frames` frames spread uniformly over the clip (repeated when the clip is shorter)."""
    return clip[np.linspace(0, len(clip) - 1, num_frames).round().astype(int)]


def torch_dtype(name: str) -> Any:
    """The `dtype` argument of from_pretrained for a dtype name; "auto" keeps the checkpoint's own."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {DTYPES}")
    if name == "auto":
        return "auto"
    import torch

    return getattr(torch, name)


def _family(model: str, revision: str | None) -> str:
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model, revision=revision).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{model!r} is a {model_type!r} checkpoint; the hf captioner runs {sorted(MODEL_CLASSES)}")
    return model_type


def _identity(model: str, revision: str | None, family: str, uses_processor: bool, **settings: Any) -> dict[str, Any]:
    # The dtype is the name asked for: under "auto" the weights hash or commit already pins the checkpoint's own.
    return {"backend": HFVideoCaptioner.name, **checkpoint_identity(model, revision), "family": family,
            "frames": "hf-processor" if uses_processor else "affectprep", **settings}


def _video_processor(model: str, revision: str | None) -> Any:
    """The checkpoint's HF processor when it can prepare videos (torchvision present, processor shipped), else None."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        return None
    try:
        processor = AutoProcessor.from_pretrained(model, revision=revision)
    except (OSError, ValueError):  # the checkpoint ships no (complete) processor: prepare frames here instead
        return None
    return processor if getattr(processor, "video_processor", None) is not None else None


def _video_settings(model: str, revision: str | None) -> dict[str, Any]:
    """The checkpoint's video preprocessing settings where transformers looks for them: the `video_processor` entry
    of processor_config.json, else video_preprocessor_config.json, else (legacy) preprocessor_config.json."""
    from transformers.utils import cached_file

    def read(name: str) -> dict[str, Any] | None:
        path = cached_file(model, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        return json.loads(Path(path).read_text()) if path else None

    nested = read("processor_config.json")
    if nested and "video_processor" in nested:
        return nested["video_processor"]
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (settings := read(name)) is not None:
            return settings
    return {}


def _pad_token_id(tokenizer: Any, model: Any) -> int:
    # generate fills the rows that finished early with it; Llama-family tokenizers often have no pad token.
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id, tokenizer.eos_token_id,
                      tokenizer.unk_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
