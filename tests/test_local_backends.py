"""Local model backends: transformers video-LLM captioners, the T5 rewriter, and the vLLM captioner's missing-extra
error, on tiny random checkpoints saved to disk and loaded back through `from_pretrained(path)`.

Random weights caption gibberish; the tests check the plumbing a real checkpoint goes through: frame preparation
(against transformers' own image processors), placeholder expansion (the model rejects a wrong visual-token count),
greedy determinism, batching, and identities that follow the weights.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from affectprep.pipeline.backends.captioner_hf import FramePreparation, HFVideoCaptioner, checkpoint_identity
from affectprep.pipeline.backends.captioner_vllm import VLLMCaptioner
from affectprep.pipeline.backends.rewriter_t5 import T5Rewriter
from affectprep.pipeline.demo import render_frames

import tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Describe the facial movements in this video."


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """Three real face clips of 16 frames: two 320x240 renders of the astronaut and a 224x224 crop of one."""
    happy = np.stack(render_frames("happy", seed=0, num_frames=16))
    surprise = np.stack(render_frames("surprise", seed=1, num_frames=16))
    return [happy, surprise, np.ascontiguousarray(surprise[:, 8:232, 48:272])]


@pytest.fixture(scope="module")
def video_llava(tmp_path_factory) -> HFVideoCaptioner:
    folder = tiny_models.save_video_llava(tmp_path_factory.mktemp("video_llava"))
    return HFVideoCaptioner(str(folder), max_new_tokens=8)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return tiny_models.save_t5(tmp_path_factory.mktemp("t5"))


def test_video_llava_captions_each_clip_deterministically(video_llava, clips):
    captions = video_llava.caption_batch(clips, PROMPT)
    assert len(captions) == len(clips) and all(isinstance(caption, str) for caption in captions)
    assert video_llava.caption_batch(clips, PROMPT) == captions
    # A clip's caption does not depend on the clips batched with it.
    assert video_llava.caption_batch(clips[1:2], PROMPT) == captions[1:2]
    assert video_llava.caption_batch([], PROMPT) == []


@pytest.mark.parametrize("build", [tiny_models.save_llava_next_video, tiny_models.save_qwen2_vl])
def test_other_video_llm_families_caption(build, clips, tmp_path):
    captioner = HFVideoCaptioner(str(build(tmp_path / "model")), max_new_tokens=8, num_frames=6, batch_size=1)
    captions = captioner.caption_batch(clips, PROMPT)
    assert len(captions) == len(clips) and all(isinstance(caption, str) for caption in captions)
    assert captioner.caption_batch(clips, PROMPT) == captions
    assert captioner.identity["family"] in {"llava_next_video", "qwen2_vl"}
    assert captioner.identity["frames"] == "affectprep"  # no torchvision here: frames prepared without it


def test_video_settings_come_from_the_checkpoint(tmp_path):
    folder = tiny_models.save_qwen2_vl(tmp_path / "qwen")
    assert HFVideoCaptioner(str(folder)).frames.size == {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
    # Since transformers 5 the processor's settings nest in processor_config.json, which wins over the older files.
    nested = {"video_processor": {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 4}}
    (folder / "processor_config.json").write_text(json.dumps(nested))
    assert HFVideoCaptioner(str(folder)).frames.size == {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 4}


def test_captioner_identity_follows_the_weights(tmp_path):
    first = tiny_models.save_video_llava(tmp_path / "a", seed=0)
    twin = tiny_models.save_video_llava(tmp_path / "b", seed=0)
    assert checkpoint_identity(str(first))["weights_sha256"] == checkpoint_identity(str(twin))["weights_sha256"]
    before = HFVideoCaptioner(str(first)).identity
    tiny_models.save_video_llava(first, seed=1)  # new weights, same folder
    after = HFVideoCaptioner(str(first)).identity
    assert after["weights_sha256"] != before["weights_sha256"]
    assert {key: value for key, value in after.items() if key != "weights_sha256"} == \
        {key: value for key, value in before.items() if key != "weights_sha256"}
    assert HFVideoCaptioner(str(twin), num_frames=4).identity != HFVideoCaptioner(str(twin)).identity
    # The stage can key its cache without loading the model.
    assert HFVideoCaptioner.describe(str(first), num_frames=8) == after


def test_qwen2_vl_frames_match_transformers_image_processor(clips):
    # An image is a 2-frame video of one repeated frame to Qwen2-VL, so its (torchvision-free) image processor checks
    # the resize, normalisation and patch order of our video preparation.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = clips[0][5]
    config = SimpleNamespace(vision_config=SimpleNamespace(patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    prepare = FramePreparation.from_settings("qwen2_vl", config, {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 300})
    ours = prepare(np.stack([frame, frame]))
    theirs = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 300})(
        frame, return_tensors="np")
    assert ours.grid == tuple(theirs["image_grid_thw"][0])
    assert ours.num_tokens == ours.grid[1] * ours.grid[2] // 4
    np.testing.assert_allclose(ours.pixels, theirs["pixel_values"], atol=1e-4)


def test_video_llava_frames_match_transformers_image_processor(clips):
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    config = SimpleNamespace(vision_config=SimpleNamespace(patch_size=14, image_size=224))
    ours = FramePreparation.from_settings("video_llava", config, {})(clips[0][:3])
    theirs = VideoLlavaImageProcessor()(images=list(clips[0][:3]), return_tensors="np")
    pixels = theirs.get("pixel_values", theirs.get("pixel_values_images"))
    np.testing.assert_allclose(ours.pixels, pixels, atol=1e-4)
    assert ours.num_tokens == 3 * (16 * 16 + 1)  # 16x16 patches and the CLS token, per frame


def test_bad_clips_and_checkpoints_are_refused_clearly(video_llava, clips, t5_folder):
    with pytest.raises(ValueError, match=r"clip 1: expected \(frames, height, width, 3\) uint8"):
        video_llava.caption_batch([clips[0], clips[1].astype(np.float32)], PROMPT)
    with pytest.raises(ValueError, match=r"clip 0: .*shape \(240, 320, 3\)"):
        video_llava.caption_batch([clips[0][0]], PROMPT)
    with pytest.raises(ValueError, match="'t5' checkpoint"):
        HFVideoCaptioner(str(t5_folder))
    with pytest.raises(ValueError, match="unknown dtype"):
        T5Rewriter(str(t5_folder), dtype="float8")


def test_t5_rewriter_rewrites_each_prompt(t5_folder):
    rewriter = T5Rewriter(str(t5_folder), max_new_tokens=12, batch_size=2)
    prompts = ["Rewrite: the person raises the eyebrows. Emotions: an emotion of surprise, an emotion of fear.",
               "Rewrite: the lips pull up. Emotions: an emotion of happiness.",
               "short"]
    finals = rewriter.rewrite_batch(prompts)
    assert len(finals) == 3 and all(isinstance(text, str) for text in finals)
    assert rewriter.rewrite_batch(prompts) == finals
    assert rewriter.rewrite_batch(prompts[::-1]) == finals[::-1]
    beams = T5Rewriter(str(t5_folder), max_new_tokens=12, num_beams=2).rewrite_batch(prompts)
    assert len(beams) == 3 and all(isinstance(text, str) for text in beams)
    with pytest.raises(ValueError, match="prompt 1: expected text"):
        rewriter.rewrite_batch(["fine", None])


def test_t5_identity_follows_the_weights(t5_folder, tmp_path):
    folder = shutil.copytree(t5_folder, tmp_path / "t5")
    before = T5Rewriter(str(folder)).identity
    assert T5Rewriter.describe(str(folder)) == before
    assert before == {**T5Rewriter(str(t5_folder)).identity, "model": "t5"}
    tiny_models.save_t5(folder, seed=1)
    assert T5Rewriter(str(folder)).identity["weights_sha256"] != before["weights_sha256"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_captioner_names_the_extra_when_vllm_is_missing(t5_folder):
    with pytest.raises(ImportError, match=r"pip install 'affectprep\[gpu\]'"):
        VLLMCaptioner(str(t5_folder))
    with pytest.raises(ImportError, match=r"pip install 'affectprep\[gpu\]'"):
        VLLMCaptioner.describe(str(t5_folder))
