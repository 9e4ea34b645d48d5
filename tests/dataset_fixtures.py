"""Tiny dataset trees in each official layout, for adapter tests and any test that needs an index.

Pytest-free: every builder takes a folder, writes the tree into it and returns the dataset root. Frame images and
WAV files are small real files. Video files are a few placeholder bytes: the adapters only check that a video exists
and is not empty, so tests that decode media must put real clips in place (tests/media_fixtures.py).
"""
from __future__ import annotations

import struct
import wave
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

PLACEHOLDER_VIDEO = b"not a real video: the adapters only check existence and size"

DFEW_CODES = (1, 2, 3, 4, 5, 6, 7)      # DFEW's official codes: happy, sad, neutral, angry, surprise, disgust, fear
FERV39K_CLIPS = (("Action", "Happy", "0001"), ("Action", "Sad", "0002"), ("Crime", "Neutral", "0003"),
                 ("Crime", "Angry", "0004"), ("Talkshow", "Surprise", "0005"), ("Talkshow", "Disgust", "0006"),
                 ("War", "Fear", "0007"))
MAFW_SINGLE = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt", "anxiety",
               "helplessness", "disappointment")
MAFW_COMPOUND = ("anger_disgust", "sadness_helplessness", "fear_surprise_anxiety", "happiness", "fear")
BP4D_HEADER = ("0", "1", "2", "4", "5", "6", "7", "10", "12", "14", "15", "17", "23", "24")   # AU5 is not in bp4d12
DISFA_AUS = (1, 2, 4, 6, 9, 12, 25, 26)


def write_image(path: Path, value: int = 128, size: int = 8) -> Path:
    """A small real image, encoded as its extension says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size, 3), value % 256, np.uint8)
    ok, data = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def write_wav(path: Path, seconds: float = 0.05, rate: int = 16000) -> Path:
    """A real 16-bit mono WAV of a quiet tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    samples = (1000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return path


def write_placeholder_video(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PLACEHOLDER_VIDEO)
    return path


def append_lines(path: Path, lines: Iterable[str], encoding: str = "utf-8") -> None:
    with open(path, "a", encoding=encoding, newline="") as f:
        for line in lines:
            f.write(line + "\n")


def line_count(path: Path) -> int:
    return len(path.read_bytes().splitlines())


# ---- DFEW --------------------------------------------------------------------------------------------------------

def dfew_fold(clip: int) -> int:
    return (clip - 1) % 5 + 1


def make_dfew(root: Path, codes: Sequence[int] = DFEW_CODES, *, frames: bool = False,
              padded_names: bool = True) -> Path:
    """Clips 1..len(codes) with those label codes; clip i is in the test set of fold dfew_fold(i).

    frames=True writes frame folders `Clip/clip_224x224/00001/` instead of videos `Clip/original/<name>.mp4`;
    padded_names=False names the videos `1.mp4` as the original release does.
    """
    split_dir = root / "EmoLabel_DataSplit"
    for fold in range(1, 6):
        for split, in_split in (("test", lambda c: dfew_fold(c) == fold), ("train", lambda c: dfew_fold(c) != fold)):
            path = split_dir / f"{split}(single-labeled)" / f"set_{fold}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = ["video_name,label"] + [f"{c},{code}" for c, code in enumerate(codes, start=1) if in_split(c)]
            path.write_text("\n".join(lines) + "\n")
    for clip in range(1, len(codes) + 1):
        if frames:
            for i in range(3):
                write_image(root / "Clip" / "clip_224x224" / f"{clip:05d}" / f"{clip:05d}_{i + 1:05d}.jpg", 40 * i)
        else:
            name = f"{clip:05d}" if padded_names else str(clip)
            write_placeholder_video(root / "Clip" / "original" / f"{name}.mp4")
    return root


def dfew_test_csv(root: Path, fold: int) -> Path:
    return root / "EmoLabel_DataSplit" / "test(single-labeled)" / f"set_{fold}.csv"


# ---- FERV39k -----------------------------------------------------------------------------------------------------

def make_ferv39k(root: Path, train: Sequence[tuple[str, str, str]] = FERV39K_CLIPS[:5],
                 test: Sequence[tuple[str, str, str]] = FERV39K_CLIPS[5:]) -> Path:
    """Clips (scene, emotion, id) as frame folders `2_ClipsforFaceCrop/Scene/Emotion/id/`."""
    setups = root / "4_setups" / "All_scenes"
    setups.mkdir(parents=True, exist_ok=True)
    for split, clips in (("train", train), ("test", test)):
        (setups / f"{split}_All.csv").write_text("".join(f"{s}/{e}/{i} {e}\n" for s, e, i in clips))
        for scene, emotion, clip in clips:
            for n in range(2):
                write_image(root / "2_ClipsforFaceCrop" / scene / emotion / clip / f"{n + 1:04d}.jpg", 60 * n)
    return root


# ---- MAFW --------------------------------------------------------------------------------------------------------

def mafw_split_dir(root: Path, task: str = "single", captions: str = "no", layout: str = "new") -> Path:
    if layout == "new":
        return root / "Train_Test_Set" / task / f"{captions}_caption_new"
    return root / "Train & Test Set" / task / f"{captions}_caption"


def make_mafw(root: Path, labels: Sequence[str] = MAFW_SINGLE, *, task: str = "single", captions: str = "no",
              layout: str = "new") -> Path:
    """Clips 00001.. with those MAFW label names; clip i is in the test set of fold (i - 1) % 5 + 1.

    With captions the lines are tab separated with a Chinese and an English caption, written in GB18030 as the
    release's captioned files are.
    """
    folder = mafw_split_dir(root, task, captions, layout)
    clips = [(f"{i:05d}.mp4", label) for i, label in enumerate(labels, start=1)]
    for fold in range(1, 6):
        for split, in_split in (("test", True), ("train", False)):
            path = folder / f"set_{fold}" / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            chosen = [(c, lab) for i, (c, lab) in enumerate(clips) if (i % 5 + 1 == fold) == in_split]
            if captions == "with":
                text = "".join(f"{c}\t{lab}\t一个人皱着眉头。\t{mafw_caption(c)}\n" for c, lab in chosen)
                path.write_bytes(text.encode("gb18030"))
            else:
                path.write_text("".join(f"{c} {lab}\n" for c, lab in chosen))
    for clip, _ in clips:
        write_placeholder_video(root / "data" / "clips" / clip)
    return root


def mafw_caption(clip: str) -> str:
    return f"A person in clip {clip} frowns, the brows drawn together."


# ---- BP4D --------------------------------------------------------------------------------------------------------

def bp4d_value(subject: str, task: str, frame: int, au: int) -> str:
    """The occurrence code the fixture writes: 0/1, with 9 (not coded) on every 7th frame for AU 2."""
    if au == 2 and frame % 7 == 0:
        return "9"
    return str((frame + au + len(subject) + int(task[1:])) % 2)


def make_bp4d(root: Path, sequences: Sequence[tuple[str, str]] = (("F001", "T1"), ("F007", "T2"), ("M011", "T1")),
              frames: Sequence[int] = tuple(range(1, 21))) -> Path:
    """AU_OCC csvs for those (subject, task) sequences over those AU frame numbers, and their images numbered
    frame - 1 (as in the release) with 4-digit padding."""
    labels = root / "AUCoding" / "AU_OCC"
    labels.mkdir(parents=True, exist_ok=True)
    for subject, task in sequences:
        lines = [",".join(BP4D_HEADER)]
        for frame in frames:
            lines.append(",".join([str(frame)] + [bp4d_value(subject, task, frame, int(a)) for a in BP4D_HEADER[1:]]))
        (labels / f"{subject}_{task}.csv").write_text("\n".join(lines) + "\n")
        for frame in frames:
            write_image(root / "Sequences" / subject / task / f"{frame - 1:04d}.jpg", frame)
    return root


# ---- DISFA -------------------------------------------------------------------------------------------------------

def disfa_intensity(subject: str, frame: int, au: int) -> int:
    return (frame + au + int(subject[2:])) % 6


def make_disfa(root: Path, subjects: Sequence[str] = ("SN001", "SN003", "SN013"), frames: int = 30) -> Path:
    for subject in subjects:
        folder = root / "ActionUnit_Labels" / subject
        folder.mkdir(parents=True, exist_ok=True)
        for au in DISFA_AUS:
            text = "".join(f"{f},{disfa_intensity(subject, f, au)}\n" for f in range(1, frames + 1))
            (folder / f"{subject}_au{au}.txt").write_text(text)
        write_placeholder_video(root / "Videos_LeftCamera" / f"LeftVideo{subject}_comp.avi")
    return root


# ---- IEMOCAP -----------------------------------------------------------------------------------------------------

# (utterance id, code, transcript) per dialog
IEMOCAP_DIALOGS = {
    "Ses01F_impro01": [("Ses01F_impro01_F000", "neu", "Excuse me."), ("Ses01F_impro01_M001", "exc", "Yes, hi!"),
                       ("Ses01F_impro01_F002", "fru", "This is the wrong line."),
                       ("Ses01F_impro01_M003", "ang", "I told you already."),
                       ("Ses01F_impro01_F004", "xxx", "Well."), ("Ses01F_impro01_M005", "sad", "I lost it.")],
    "Ses02M_script01_1": [("Ses02M_script01_1_F000", "hap", "What a day!"),
                          ("Ses02M_script01_1_M001", "sad", "I miss her."),
                          ("Ses02M_script01_1_F002", "fru", "Not again.")],
}


def iemocap_session(utterance: str) -> int:
    return int(utterance[3:5])


def make_iemocap(root: Path, dialogs: dict[str, list[tuple[str, str, str]]] | None = None) -> Path:
    for dialog, utterances in (dialogs or IEMOCAP_DIALOGS).items():
        session = root / f"Session{iemocap_session(dialog)}"
        evaluation = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        transcript = []
        for n, (utterance, code, text) in enumerate(utterances):
            start, end = 2.0 * n + 0.5, 2.0 * n + 1.75
            evaluation += [f"[{start:.4f} - {end:.4f}]\t{utterance}\t{code}\t[2.5000, 3.0000, 2.5000]",
                           "C-E1:\tNeutral;\t()", "C-E2:\tNeutral;\t()", "A-E1:\tval 3; act 2; dom  3;\t()", ""]
            transcript.append(f"{utterance} [{start:08.4f}-{end:08.4f}]: {text}")
            write_wav(session / "sentences" / "wav" / dialog / f"{utterance}.wav")
        (session / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
        (session / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(evaluation) + "\n")
        (session / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
        (session / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(transcript) + "\n")
    return root


# ---- generic CSV -------------------------------------------------------------------------------------------------

def make_csv_dataset(root: Path) -> Path:
    """One sample of each media kind: a video, a frame folder, an image and a WAV."""
    write_placeholder_video(root / "clips" / "a.mp4")
    for i in range(2):
        write_image(root / "clips" / "b" / f"{i}.jpg", 100 * i)
    write_image(root / "images" / "c.png", 50)
    write_wav(root / "audio" / "d.wav")
    (root / "labels.csv").write_text(
        "path,label,split,subject,fold\n"
        "clips/a.mp4,joy,train,s1,1\n"
        "clips/b,anger,val,s2,2\n"
        "images/c.png,joy,test,s1,\n"
        "audio/d.wav,calm,,,\n")
    return root
