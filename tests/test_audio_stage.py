"""The `audio` stage: real speech (espeak-ng, committed under tests/fixtures/iemocap/) through the real DAG, the
resampler and down-mix checked on the signal, every kind of bad input a failed row, and vision stages kept apart."""
from __future__ import annotations

import shutil
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from affectprep import schema as S
from affectprep.config import DatasetConfig, ProjectConfig
from affectprep.pipeline.dag import applies_to, ensure_index, plan_stages, run_pipeline
from affectprep.pipeline.media import MediaError
from affectprep.pipeline.stages import STAGES
from affectprep.pipeline.stages.audio import AudioConfig, AudioStage, read_audio

from fixtures.make_iemocap import DIALOGS

FIXTURE = Path(__file__).parent / "fixtures" / "iemocap"
SPOKEN = {u: (code, text, rate) for utterances in DIALOGS.values() for u, code, text, rate, _ in utterances}
GOOD = sorted(u for u, (code, *_) in SPOKEN.items() if code != "fru")
# Bad utterances appended to a copy of the fixture's second dialog
DIALOG = "Ses02M_script01_1"
CORRUPT, EMPTY, UNTRANSCRIBED, MISSING, TRUNCATED = (f"{DIALOG}_{n}" for n in ("F002", "M003", "F004", "M005", "F006"))


def fixture_wav(utterance: str) -> Path:
    return FIXTURE / f"Session{int(utterance[3:5])}" / "sentences" / "wav" / utterance.rsplit("_", 1)[0] / \
        f"{utterance}.wav"


def wav_samples(path: Path) -> tuple[np.ndarray, int]:
    """int16 samples (frames x channels) and rate of a PCM WAV, read independently of the stage."""
    with wave.open(str(path), "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
        return data, w.getframerate()


def add_bad_utterances(root: Path) -> None:
    session = root / "Session2"
    wavs = session / "sentences" / "wav" / DIALOG
    good = wavs / f"{DIALOG}_M001.wav"
    (wavs / f"{CORRUPT}.wav").write_bytes(np.random.default_rng(3).integers(0, 256, 8000, np.uint8).tobytes())
    with wave.open(str(wavs / f"{EMPTY}.wav"), "wb") as w:     # a valid header and no samples
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    shutil.copy(good, wavs / f"{UNTRANSCRIBED}.wav")
    data = good.read_bytes()
    (wavs / f"{TRUNCATED}.wav").write_bytes(data[: len(data) // 2])
    bad = {CORRUPT: "neu", EMPTY: "hap", UNTRANSCRIBED: "sad", MISSING: "ang", TRUNCATED: "neu"}
    with open(session / "dialog" / "EmoEvaluation" / f"{DIALOG}.txt", "a") as f:
        for n, (utterance, code) in enumerate(bad.items()):
            f.write(f"[{20 + 2 * n:.4f} - {21 + 2 * n:.4f}]\t{utterance}\t{code}\t[2.5000, 2.5000, 2.5000]\n\n")
    with open(session / "dialog" / "transcriptions" / f"{DIALOG}.txt", "a") as f:
        for n, utterance in enumerate(bad):
            if utterance != UNTRANSCRIBED:
                f.write(f"{utterance} [{20 + 2 * n:08.4f}-{21 + 2 * n:08.4f}]: Words.\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iemocap")
    root = tmp / "IEMOCAP_full_release"
    shutil.copytree(FIXTURE, root)
    add_bad_utterances(root)
    return ProjectConfig(None, tmp / "cache", {"iemocap": DatasetConfig("iemocap", "iemocap", root)}, {})


@pytest.fixture(scope="module")
def first_run(project):
    return run_pipeline(project, "audio", scheduler="inline", progress=False)


def audio_store(project):
    index = ensure_index(project, project.datasets["iemocap"])
    return index, {p.stage.name: p.store for p in plan_stages(project, index, "audio")}["audio"]


def stored(project) -> dict[str, dict]:
    return {r["sample_id"]: r for r in audio_store(project)[1].read().to_pylist()}


def pcm(row: dict) -> np.ndarray:
    return np.frombuffer(row["waveform"], "<i2").astype(np.float64)


def test_every_utterance_is_16khz_mono_with_its_transcript(project, first_run):
    rows = stored(project)
    ok = {k: r for k, r in rows.items() if r["status"] == S.STATUS_OK}
    assert sorted(ok) == GOOD          # the frustrated one is outside the 4-class protocol: never reaches the stage
    for utterance, row in ok.items():
        _, text, rate = SPOKEN[utterance]
        source, source_rate = wav_samples(fixture_wav(utterance))
        assert source_rate == rate and row["sample_rate"] == 16000 and row["transcript"] == text
        assert row["num_samples"] == len(row["waveform"]) // 2 == int(np.ceil(len(source) * 16000 / rate))


def test_resampling_keeps_the_speech_and_adds_no_images(project, first_run):
    rows = stored(project)
    native = "Ses01F_impro01_M001"                         # recorded at 16 kHz: stored sample for sample
    assert np.array_equal(pcm(rows[native]), wav_samples(fixture_wav(native))[0][:, 0])
    eight = "Ses01F_impro01_F000"                          # 8 kHz: upsampled 2x
    source = wav_samples(fixture_wav(eight))[0][:, 0].astype(np.float64)
    out = pcm(rows[eight])
    spectrum = np.abs(np.fft.rfft(out)) ** 2
    freqs = np.fft.rfftfreq(len(out), 1 / 16000)
    # nothing new above the source's 4 kHz band (sample repetition leaves 4 % there, linear interpolation 0.9 %)
    assert spectrum[freqs > 4200].sum() < 0.001 * spectrum.sum()
    assert spectrum[(freqs > 300) & (freqs < 3500)].sum() > 0.5 * spectrum.sum()   # the speech band is all there
    back = out[::2]                                        # a 2x upsampler keeps the original samples' values
    assert np.corrcoef(back, source)[0, 1] > 0.99
    assert abs(np.sqrt((back ** 2).mean()) / np.sqrt((source ** 2).mean()) - 1) < 0.05
    stereo = "Ses02M_script01_1_F000"                      # 11.025 kHz stereo: channels averaged, then resampled
    channels, rate = wav_samples(fixture_wav(stereo))
    expected = resample_poly(channels.mean(axis=1) / 32768, 640, 441) * 32768     # 16000 / 11025 = 640 / 441
    assert rate == 11025 and np.abs(pcm(rows[stereo]) - expected).max() <= 1.0
    left_only = resample_poly(channels[:, 0] / 32768, 640, 441) * 32768
    assert np.abs(pcm(rows[stereo]) - left_only).max() > 100      # the quieter right channel is in the mix


def test_bad_files_become_failed_rows_with_readable_errors(project, first_run):
    index, _ = audio_store(project)
    index_errors = {r["sample_id"]: r["error"] for r in index.read(status="failed").to_pylist()}
    assert list(index_errors) == [MISSING] and f"{MISSING}.wav not found" in index_errors[MISSING]
    errors = {k: r["error"] for k, r in stored(project).items() if r["status"] == S.STATUS_FAILED}
    assert errors.keys() == {CORRUPT, EMPTY, UNTRANSCRIBED, TRUNCATED}
    assert f"unreadable WAV {CORRUPT}.wav: file does not start with RIFF id" == errors[CORRUPT]
    assert f"{EMPTY}.wav holds no audio samples" == errors[EMPTY]
    assert errors[UNTRANSCRIBED].startswith("no transcript for this utterance")
    assert f"truncated WAV {TRUNCATED}.wav: the header promises" in errors[TRUNCATED]
    report = next(s for s in first_run.stages if s.stage == "audio")
    assert (report.total, report.ok, report.failed) == (len(GOOD) + 4, len(GOOD), 4)
    assert first_run.failed == 1 + 4


def test_rerun_keeps_the_work_and_a_repaired_file_is_redone_alone(project, first_run):
    _, store = audio_store(project)
    before = stored(project)
    again = run_pipeline(project, "audio", scheduler="inline", progress=False)
    assert all(s.ok == 0 and s.failed == 0 for s in again.stages)
    wavs = project.datasets["iemocap"].root / "Session2" / "sentences" / "wav" / DIALOG
    shutil.copy(wavs / f"{DIALOG}_M001.wav", wavs / f"{CORRUPT}.wav")
    repaired = run_pipeline(project, "audio", scheduler="inline", progress=False, retry_failed=True)
    report = next(s for s in repaired.stages if s.stage == "audio")
    assert report.ok == 1 and report.failed == 3          # the other three are still bad, and say so again
    after = stored(project)
    assert after[CORRUPT]["status"] == S.STATUS_OK and after[CORRUPT]["transcript"] == "Words."
    assert all(after[u]["waveform"] == before[u]["waveform"] for u in GOOD)


def test_only_the_speech_stages_apply_to_audio(tmp_path):
    audio_stage = AudioStage(AudioConfig())
    for name, cls in STAGES.items():
        if cls.reads:
            stage = cls(cls.Config())
            speech = name in ("audio", "audio_features")
            assert applies_to(stage, "audio", 1) == speech
            assert applies_to(stage, "image", 1) == (not speech)
    assert not applies_to(audio_stage, "video", 0)
    # a dataset mixing an image and a recording: each branch sees only its own kind
    from image_dataset_fixtures import write_face
    write_face(tmp_path / "data" / "face.png", "happy")
    shutil.copy(fixture_wav("Ses01F_impro01_F000"), tmp_path / "data" / "voice.wav")
    (tmp_path / "data" / "labels.csv").write_text("path,label,split\nface.png,joy,train\nvoice.wav,calm,test\n")
    project = ProjectConfig(None, tmp_path / "cache", {"mixed": DatasetConfig("mixed", "csv", tmp_path / "data")},
                            {"faces": {"backend": "haar"}, "audio": {"require_transcript": False}})
    run_pipeline(project, "faces", scheduler="inline", progress=False)
    report = run_pipeline(project, "audio", scheduler="inline", progress=False)
    index = ensure_index(project, project.datasets["mixed"])
    stores = {p.stage.name: p.store for p in plan_stages(project, index, None)}
    assert set(stores["frames"].statuses()) == set(stores["faces"].statuses()) == {"face.png"}
    assert stores["audio"].statuses() == {"voice.wav": S.STATUS_OK}
    assert report.stages[0].stage == "audio" and report.failed == 0
    assert stores["audio"].read().to_pylist()[0]["transcript"] is None


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_widths_and_signs(tmp_path, width):
    tone = 0.5 * np.sin(2 * np.pi * 300 * np.arange(800) / 16000)
    tone[:5] = [-1.0, -0.5, 0.0, 0.5, 0.99]
    scale = 2 ** (8 * width - 1)
    ints = np.clip(np.round(tone * scale), -scale, scale - 1).astype(np.int64)
    data = (ints + 128).astype(np.uint8).tobytes() if width == 1 else \
        b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints)
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(16000)
        w.writeframes(data)
    samples, rate = read_audio(path)
    # within one quantisation step (float32 itself keeps 24 bits, so 32-bit PCM is good to float32 precision)
    assert rate == 16000 and np.abs(samples - tone).max() <= max(1.0 / scale, 2.0 ** -24)


def test_float_wav_and_flac_are_decoded_by_pyav(tmp_path):
    import av
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(4410) / 44100)).astype("<f4")
    interleaved = np.stack([tone, 0.5 * tone], axis=1).tobytes()
    fmt = struct.pack("<HHIIHH", 3, 2, 44100, 44100 * 8, 8, 32)          # WAVE_FORMAT_IEEE_FLOAT, stereo
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(interleaved))
    (tmp_path / "float.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body) + len(interleaved)) + body
                                         + interleaved)
    samples, rate = read_audio(tmp_path / "float.wav")
    assert rate == 44100 and np.abs(samples - 0.75 * tone).max() < 1e-6
    speech, speech_rate = wav_samples(fixture_wav("Ses01F_impro01_F000"))
    with av.open(str(tmp_path / "speech.flac"), "w") as container:
        stream = container.add_stream("flac", rate=speech_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(speech.T.copy(), format="s16", layout="mono")
        frame.sample_rate = speech_rate
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    samples, rate = read_audio(tmp_path / "speech.flac")
    assert rate == speech_rate and np.array_equal(np.round(samples * 32768), speech[:, 0])   # FLAC is lossless
    (tmp_path / "noise.flac").write_bytes(b"not audio at all" * 64)
    with pytest.raises(MediaError, match="noise.flac"):
        read_audio(tmp_path / "noise.flac")
