"""The `audio_features` stage on real speech (the committed IEMOCAP fixture): tiny Wav2Vec2 and BERT checkpoints
saved and loaded through the real path, cached tokens equal to what the encoders make of each utterance, the
fine-tuning and the features paths feeding the encoder the same input, and MGCMA trained from them
(`--from features`), every ablation row for one epoch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from affectprep.config import ConfigError, DatasetConfig, ProjectConfig
from affectprep.models.data import StoreAudio, collate
from affectprep.models.mgcma import TINY_SPEECH, TINY_TEXT
from affectprep.models.registry import create_model, model_ablations
from affectprep.models.runs import RunFolder, TrainConfig
from affectprep.models.text import tiny_tokenizer
from affectprep.models.train import train, train_folds
from affectprep.pipeline.backends.feature_encoders import SpeechTokens
from affectprep.pipeline.dag import run_pipeline
from affectprep.speech import MAX_UTTERANCE_SECONDS
from affectprep.train_sources import resolve_sources

FIXTURE = Path(__file__).parent / "fixtures" / "iemocap"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> ProjectConfig:
    tmp = tmp_path_factory.mktemp("audio_features")
    shutil.copytree(FIXTURE, tmp / "IEMOCAP")
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**TINY_SPEECH)).save_pretrained(tmp / "wav2vec2")
    BertModel(BertConfig(**TINY_TEXT), add_pooling_layer=False).save_pretrained(tmp / "bert")
    tiny_tokenizer().save_pretrained(tmp / "bert")
    stages = {"audio_features": {"speech_encoder": str(tmp / "wav2vec2"), "text_encoder": str(tmp / "bert")}}
    project = ProjectConfig(None, tmp / "cache", {"iemocap": DatasetConfig("iemocap", "iemocap", tmp / "IEMOCAP")},
                            stages)
    assert run_pipeline(project, scheduler="inline", progress=False).failed == 0
    return project


def test_cached_tokens_are_the_encoders_output_for_each_utterance(project):
    sources = resolve_sources(project, "iemocap", features=True)
    audio = sources.store("audio").read().to_pylist()
    cached = {r["sample_id"]: r for r in sources.store("audio_features").read().to_pylist()}
    assert sorted(cached) == sorted(r["sample_id"] for r in audio) and len(cached) >= 4
    speech = Wav2Vec2Model.from_pretrained(Path(project.stages["audio_features"]["speech_encoder"])).eval()
    row = audio[0]
    waveform = np.frombuffer(row["waveform"], dtype="<i2").astype(np.float32) / 32768.0
    # The checkpoint has no feature extractor config: Wav2Vec2's default do_normalize=True applies.
    inputs = Wav2Vec2FeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt").input_values
    with torch.no_grad():
        expected = speech(inputs).last_hidden_state[0]
    got = cached[row["sample_id"]]
    assert got["audio_shape"] == list(expected.shape)
    tokens = np.frombuffer(got["audio_tokens"], dtype="<f2").reshape(got["audio_shape"])
    np.testing.assert_allclose(tokens, expected.numpy(), atol=2e-2, rtol=1e-2)     # stored as float16
    words = len(tiny_tokenizer()(row["transcript"])["input_ids"])
    assert got["text_shape"] == [words, TINY_TEXT["hidden_size"]]


def encoder_inputs(speech_encoder: torch.nn.Module) -> list[torch.Tensor]:
    """Every input_values tensor `speech_encoder` is called with."""
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["input_values"]).detach().clone())
    speech_encoder.register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.parametrize("do_normalize", [True, False])
def test_fine_tuning_and_features_paths_feed_the_encoder_the_same_input(project, tmp_path, do_normalize):
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**TINY_SPEECH)).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=do_normalize).save_pretrained(tmp_path)
    sources = resolve_sources(project, "iemocap")
    audio = sources.store("audio")
    rows = sorted(sources.store("index").read(["sample_id", "label"]).to_pylist(), key=lambda r: r["sample_id"])[:2]
    # Fine-tuning: the evaluation items of the audio store, collated, through the model's own preprocessing.
    items = list(StoreAudio(audio, rows, train=False, shuffle_buffer=0))
    model = create_model("mgcma", tiny=True, speech_encoder=str(tmp_path)).eval()
    fine_tuning = encoder_inputs(model.speech_encoder)
    with torch.no_grad():
        model(**model.batch_inputs(collate(items)))
    # Cached features: the audio_features stage's encoder on the same utterances.
    tokens = SpeechTokens(str(tmp_path))
    cached = encoder_inputs(tokens.model)
    stored = {r["sample_id"]: r for r in audio.read(["sample_id", "waveform"]).to_pylist()}
    tokens.encode([np.frombuffer(stored[r["sample_id"]]["waveform"], dtype="<i2").astype(np.float32) / 32768.0
                   for r in rows])
    extractor = Wav2Vec2FeatureExtractor(do_normalize=do_normalize)
    assert len(fine_tuning) == len(cached) == 2
    for item, ours, theirs in zip(items, fine_tuning, cached):
        expected = extractor(item["waveform"].numpy(), sampling_rate=16000, return_tensors="pt").input_values
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # Both cut an utterance at the same length.
    assert StoreAudio(audio, rows, train=True).max_seconds == MAX_UTTERANCE_SECONDS
    assert tokens.max_samples == MAX_UTTERANCE_SECONDS * 16000


def test_mgcma_trains_from_the_cached_tokens(project, tmp_path):
    sources = {"expression": resolve_sources(project, "iemocap", features=True)}
    config = TrainConfig(model_name="mgcma", tiny=True, source="features", fold=1, epochs=2, batch_size=2,
                         num_workers=0, warmup_epochs=0)
    run = train(config, sources, tmp_path, echo=lambda _: None)
    results = RunFolder(run).read_json("results.json")
    test_ids = [r["sample_id"] for r in sources["expression"].store("index").read().to_pylist() if r["fold"] == 1]
    assert results["num_samples"] == len(test_ids) > 0
    assert {"uar", "war"} <= set(results["expression"])


def test_leave_one_session_out_runs_every_session_and_averages(project, tmp_path):
    sources = {"expression": resolve_sources(project, "iemocap", features=True)}
    config = TrainConfig(model_name="mgcma", tiny=True, source="features", epochs=1, batch_size=2, num_workers=0,
                         warmup_epochs=0)
    summary_path = train_folds(config, sources, [1, 2], tmp_path, echo=lambda _: None)
    summary = json.loads(summary_path.read_text())
    assert summary["folds"] == [1, 2] and sorted(summary["runs"]) == ["1", "2"]
    per_fold = [summary["results"][k]["expression"]["war"] for k in ("1", "2")]
    assert summary["expression"]["war"]["mean"] == pytest.approx(sum(per_fold) / 2)
    assert summary["expression"]["war"]["std"] == pytest.approx(abs(per_fold[0] - per_fold[1]) / 2)
    for fold in ("1", "2"):
        assert RunFolder(Path(summary["runs"][fold])).config().fold == int(fold)


def test_audio_features_is_opt_in(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "IEMOCAP")
    project = ProjectConfig(None, tmp_path / "cache",
                            {"iemocap": DatasetConfig("iemocap", "iemocap", tmp_path / "IEMOCAP")}, {})
    with pytest.raises(ConfigError, match="speech_encoder"):
        run_pipeline(project, "audio_features", scheduler="inline", progress=False)


@pytest.mark.parametrize("ablation", model_ablations("mgcma"), ids=lambda a: f"{a.table} {a.row}")
def test_each_mgcma_ablation_row_trains_for_one_epoch(project, ablation, tmp_path):
    sources = {"expression": resolve_sources(project, "iemocap", features=True)}
    options = {key.removeprefix("model."): value for key, value in ablation.set.items() if key.startswith("model.")}
    training = {key: value for key, value in ablation.set.items() if not key.startswith("model.")}
    config = TrainConfig(**{"model_name": "mgcma", "tiny": True, "source": "features", "fold": 1, "epochs": 1,
                            "batch_size": 2, "num_workers": 0, "warmup_epochs": 0, "model": options, **training})
    run = train(config, sources, tmp_path, echo=lambda _: None)
    assert {"uar", "war"} <= set(RunFolder(run).read_json("results.json")["expression"])
    (entry,) = RunFolder(run).read_json("metrics.json")
    assert np.isfinite(entry["loss"])
    assert ("distribution" in entry) == options.get("distribution_alignment", True)
    assert ("instance" in entry) == options.get("instance_alignment", True)
