"""The `audio_features` stage on real speech (the committed IEMOCAP fixture): tiny Wav2Vec2 and BERT checkpoints
saved and loaded through the real path, cached tokens equal to what the encoders make of each utterance, and MGCMA
trained from them (`--from features`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

from affectprep.config import ConfigError, DatasetConfig, ProjectConfig
from affectprep.models.mgcma import TINY_SPEECH, TINY_TEXT
from affectprep.models.runs import RunFolder, TrainConfig
from affectprep.models.text import tiny_tokenizer
from affectprep.models.train import train, train_folds
from affectprep.pipeline.dag import run_pipeline
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
    waveform = (waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)   # Wav2Vec2's do_normalize
    with torch.no_grad():
        expected = speech(torch.from_numpy(waveform)[None]).last_hidden_state[0]
    got = cached[row["sample_id"]]
    assert got["audio_shape"] == list(expected.shape)
    tokens = np.frombuffer(got["audio_tokens"], dtype="<f2").reshape(got["audio_shape"])
    np.testing.assert_allclose(tokens, expected.numpy(), atol=2e-2, rtol=1e-2)     # stored as float16
    words = len(tiny_tokenizer()(row["transcript"])["input_ids"])
    assert got["text_shape"] == [words, TINY_TEXT["hidden_size"]]


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
