"""What the two speech paths must agree on, so a model trained on cached features sees what fine-tuning sees: the
fine-tuning path (models: StoreAudio waveforms, normalised by the model itself) and the cached-features path
(pipeline: the audio_features stage). Both cut an utterance at MAX_UTTERANCE_SECONDS and normalise the waveform as
the checkpoint's Wav2Vec2 feature extractor would (`do_normalize`), with this module's functions, and cut the
transcript at MAX_TRANSCRIPT_TOKENS tokens by default."""
from __future__ import annotations

import json
from pathlib import Path

SAMPLE_RATE = 16000
# The longest utterance any path feeds the speech encoder (training takes a window this long, evaluation and the
# features stage its start). IEMOCAP's longest utterance is about 35 s: none is cut, so no utterance loses speech
# its transcript still has.
MAX_UTTERANCE_SECONDS = 35.0
# The transcript's token limit in both paths (IEMOCAP's transcripts stay far below it).
MAX_TRANSCRIPT_TOKENS = 256
# Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm's constant.
_VARIANCE_EPSILON = 1e-7


def normalizes_waveform(checkpoint: str | Path | None) -> bool:
    """`do_normalize` of the checkpoint's feature extractor config (preprocessor_config.json, a local folder or a
    hub id in the cache). True, Wav2Vec2FeatureExtractor's default, for a checkpoint without one and for None (a
    randomly initialised encoder)."""
    if checkpoint is None:
        return True
    folder = Path(checkpoint)
    if folder.is_dir():
        path = folder / "preprocessor_config.json"
        path = path if path.exists() else None
    else:
        from transformers.utils import cached_file

        path = cached_file(str(checkpoint), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return True
    return bool(json.loads(Path(path).read_text()).get("do_normalize", True))


def normalize_waveform(waveform, mask=None):
    """Zero mean and unit variance over each row's real samples, padding set to 0: (B, N) float tensor and (B, N)
    mask of real samples (None: all real) -> (B, N). Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm in torch,
    so it runs on the model's device."""
    import torch

    real = torch.ones_like(waveform, dtype=torch.bool) if mask is None else mask.bool()
    weights = real.to(waveform.dtype)
    count = weights.sum(dim=1, keepdim=True).clamp_min(1)
    mean = (waveform * weights).sum(dim=1, keepdim=True) / count
    variance = ((waveform - mean) * weights).pow(2).sum(dim=1, keepdim=True) / count
    return (waveform - mean) / torch.sqrt(variance + _VARIANCE_EPSILON) * weights
