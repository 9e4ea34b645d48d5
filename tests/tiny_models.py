"""Tiny randomly initialised checkpoints, saved like real ones so backends load them through `from_pretrained(path)`.

Each builder writes config.json, model.safetensors, generation_config.json, a tokenizer made offline (a byte-level
BPE trained in memory, or ByT5's byte tokenizer) and, for the video LLMs, the video processor config of a real
checkpoint scaled down to the tiny vision tower (56x56 frames). Same `seed`, same weights; another seed, other
weights. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FRAME_SIZE = 56  # the tiny vision towers' input side: 4 x 4 patches of 14 pixels

_CORPUS = ["the person slowly raises the eyebrows and opens the mouth",
           "the corners of the lips pull up into a broad smile and the cheeks rise",
           "the brows lower and draw together while the lips press tightly",
           "an emotion of happiness, surprise or sadness shows on the face"]

# Small dimensions shared by every tiny model: 2 layers, 2 heads, width 32.
_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 1024}
_CLIP_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": FRAME_SIZE, "patch_size": 14,
                "projection_dim": 32}


def save_video_llava(folder: Path, *, seed: int = 0) -> Path:
    """A Video-LLaVA checkpoint (CLIP video tower + Llama) with a Llama-style tokenizer: BOS, `<image>`, `<video>`."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    tokenizer = _bpe_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"], bos="<s>", eos="</s>",
                               pad="<pad>", unk="<unk>")
    ids = _ids(tokenizer, "<s>", "</s>", "<pad>", "<image>", "<video>")
    frames = 8
    config = VideoLlavaConfig(
        vision_config=_CLIP_VISION,
        text_config={"model_type": "llama", **_TEXT, "vocab_size": len(tokenizer),
                     "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]},
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        image_seq_length=_patches(), video_seq_length=frames * (_patches() + 1))
    _save(VideoLlavaForConditionalGeneration, config, seed, tokenizer, folder)
    _write_json(folder / "video_preprocessor_config.json", {
        "video_processor_type": "VideoLlavaVideoProcessor", "size": {"shortest_edge": FRAME_SIZE},
        "crop_size": {"height": FRAME_SIZE, "width": FRAME_SIZE}, "do_center_crop": True, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "resample": 3})
    return folder


def save_llava_next_video(folder: Path, *, seed: int = 0) -> Path:
    """A LLaVA-NeXT-Video checkpoint (CLIP tower, 2x2 average pooling per frame + Llama)."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    tokenizer = _bpe_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"], bos="<s>", eos="</s>",
                               pad="<pad>", unk="<unk>")
    ids = _ids(tokenizer, "<s>", "</s>", "<pad>", "<image>", "<video>")
    config = LlavaNextVideoConfig(
        vision_config=_CLIP_VISION,
        text_config={"model_type": "llama", **_TEXT, "vocab_size": len(tokenizer),
                     "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]},
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        image_grid_pinpoints=[[FRAME_SIZE, FRAME_SIZE]], spatial_pool_stride=2, spatial_pool_mode="average")
    _save(LlavaNextVideoForConditionalGeneration, config, seed, tokenizer, folder)
    _write_json(folder / "video_preprocessor_config.json", {
        "video_processor_type": "LlavaNextVideoVideoProcessor", "size": {"shortest_edge": FRAME_SIZE},
        "crop_size": {"height": FRAME_SIZE, "width": FRAME_SIZE}, "do_center_crop": True,
        "rescale_factor": 1 / 255, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3})
    return folder


def save_qwen2_vl(folder: Path, *, seed: int = 0) -> Path:
    """A Qwen2-VL checkpoint (ViT with 2x2 merge and 2-frame temporal patches + Qwen2 with M-RoPE)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _bpe_tokenizer(specials, eos="<|im_end|>", pad="<|endoftext|>")
    ids = _ids(tokenizer, *specials)
    config = Qwen2VLConfig(
        text_config={**_TEXT, "vocab_size": len(tokenizer), "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     # head_dim 16: 8 rotary frequencies split over time, height and width
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    _save(Qwen2VLForConditionalGeneration, config, seed, tokenizer, folder)
    _write_json(folder / "video_preprocessor_config.json", {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": FRAME_SIZE * FRAME_SIZE, "longest_edge": FRAME_SIZE * FRAME_SIZE},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "rescale_factor": 1 / 255,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3})
    return folder


def save_t5(folder: Path, *, seed: int = 0) -> Path:
    """A T5 encoder-decoder with ByT5's byte tokenizer (3 specials + 256 bytes + 125 sentinels = 384 ids)."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    _save(T5ForConditionalGeneration, config, seed, tokenizer, folder)
    return folder


def _save(model_class, config, seed: int, tokenizer, folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_class(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _bpe_tokenizer(specials: list[str], *, bos: str | None = None, eos: str, pad: str, unk: str | None = None):
    """A byte-level BPE trained in memory on a few facial-description sentences; `bos` is prepended, as Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    roles = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    named = {role: token for role, token in roles.items() if token is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **named,
                                   additional_special_tokens=[t for t in specials if t not in named.values()])


def _ids(tokenizer, *tokens: str) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}


def _patches() -> int:
    return (FRAME_SIZE // 14) ** 2


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def save_video_classifier(folder: Path, *, labels, seed: int = 0) -> Path:
    """A tiny VideoMAE video classifier whose id2label are `labels` (a list, or its JSON text)."""
    import json

    import torch
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    names = json.loads(labels) if isinstance(labels, str) else list(labels)
    torch.manual_seed(seed)
    config = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                            num_labels=len(names), id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)})
    VideoMAEForVideoClassification(config).eval().save_pretrained(folder)
    return folder


def save_t5_that_writes(folder: Path, *, seed: int = 0) -> Path:
    """A tiny T5 whose greedy output is never empty: a random T5 tends to emit only special tokens, which decode
    to nothing. Its output layer is replaced by two opposite rows for the bytes 'a' and 'b', so one of them always
    wins and it writes a string of a's and b's until max_new_tokens."""
    import torch
    from transformers import T5ForConditionalGeneration

    save_t5(folder, seed=seed)
    model = T5ForConditionalGeneration.from_pretrained(folder)
    model.config.tie_word_embeddings = False
    direction = torch.randn(model.config.d_model, generator=torch.Generator().manual_seed(seed))
    head = torch.zeros_like(model.lm_head.weight)
    head[ord("a") + 3], head[ord("b") + 3] = direction, -direction   # ByT5 ids: 3 specials, then the bytes
    model.lm_head = torch.nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
    model.lm_head.weight.data.copy_(head)
    model.save_pretrained(folder)
    return folder
