"""Tiny still-image datasets in each official layout (RAF-DB, AffectNet, FER+, Oulu-CASIA, NVIE), for adapter tests
and end-to-end runs.

Pytest-free: every builder takes a folder, writes the tree into it and returns the dataset root. The images are the
demo face (pipeline/demo.py) showing an expression, encoded as the release stores them; each tree also holds
the bad rows a real copy can have (missing image, corrupt image, unknown label), whose ids are in the constants below.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from affectprep.pipeline.demo import render_frames

CORRUPT = np.random.default_rng(7).integers(0, 256, 3000, np.uint8).tobytes()   # random bytes named .jpg / .png


@lru_cache(maxsize=None)
def clip(label: str, seed: int = 0, size: tuple[int, int] = (160, 120), frames: int = 5) -> tuple[np.ndarray, ...]:
    """RGB frames of a short demo clip: the face at rest, then the expression building up."""
    return tuple(render_frames(label, seed=seed, num_frames=frames, size=size))


def write_face(path: Path, label: str, seed: int = 0, size: tuple[int, int] = (160, 120), *,
               frame: int | None = None, frames: int = 5, gray: bool = False) -> Path:
    """One frame of the clip (the middle one unless `frame` says), encoded as the extension says."""
    images = clip(label, seed, size, frames)
    image = images[len(images) // 2 if frame is None else frame]
    image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY if gray else cv2.COLOR_RGB2BGR)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(CORRUPT)
    return path


def truncate(path: Path) -> Path:
    """Keep the first third of an image: its signature is intact, its pixels are not."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return path


# ---- RAF-DB --------------------------------------------------------------------------------------------------------

# name -> RAF-DB code (1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral)
RAFDB_GOOD = {"train_00001.jpg": "4", "train_00002.jpg": "6", "test_0001.jpg": "7", "test_0002.jpg": "1"}
RAFDB_UNKNOWN, RAFDB_MISSING, RAFDB_CORRUPT = "train_00003", "train_00004", "test_0003"
_DEMO_LABEL = {"1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry", "7": "neutral"}


def make_rafdb(root: Path) -> Path:
    lines = [f"{name} {code}" for name, code in RAFDB_GOOD.items()]
    lines += [f"{RAFDB_UNKNOWN}.jpg 9", f"{RAFDB_MISSING}.jpg 3", f"{RAFDB_CORRUPT}.jpg 2"]
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for seed, (name, code) in enumerate([*RAFDB_GOOD.items(), (f"{RAFDB_UNKNOWN}.jpg", "4")]):
        stem = Path(name).stem
        write_face(root / "Image" / "original" / name, _DEMO_LABEL[code], seed)
        write_face(root / "Image" / "aligned" / f"{stem}_aligned.jpg", _DEMO_LABEL[code], seed, (100, 100))
    for kind, file in (("original", f"{RAFDB_CORRUPT}.jpg"), ("aligned", f"{RAFDB_CORRUPT}_aligned.jpg")):
        write_corrupt(root / "Image" / kind / file)
    return root


# ---- AffectNet -----------------------------------------------------------------------------------------------------

AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,"
                    "arousal")
# (subDirectory_filePath, expression code) per split; codes 7 (contempt) and 8..10 are left out by the protocols
AFFECTNET_TRAIN = (("101/a1.jpg", "1"), ("101/a2.jpg", "6"), ("102/b1.jpg", "7"), ("102/b2.jpg", "8"),
                   ("103/c1.jpg", "10"), ("103/c2.jpg", "12"), ("103/c3.jpg", "0"))
AFFECTNET_VALIDATION = (("201/d1.jpg", "3"), ("201/d2.jpg", "9"), ("202/e1.png", "2"))
AFFECTNET_UNKNOWN, AFFECTNET_MISSING, AFFECTNET_CORRUPT = "103/c2.jpg", "103/c3.jpg", "202/e1.png"
_AFFECTNET_DEMO = {"0": "neutral", "1": "happy", "2": "sad", "3": "surprise", "4": "fear", "5": "disgust",
                   "6": "angry", "7": "disgust", "8": "neutral", "9": "neutral", "10": "neutral", "12": "neutral"}


def affectnet_line(path: str, code: str) -> str:
    landmarks = ";".join(f"{20 + i % 17 * 7:.2f};{30 + i // 17 * 20:.2f}" for i in range(68))
    return f"{path},10,8,140,104,{landmarks},{code},0.5,-0.25"


def make_affectnet(root: Path) -> Path:
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True, exist_ok=True)
    for name, rows in (("training.csv", AFFECTNET_TRAIN), ("validation.csv", AFFECTNET_VALIDATION)):
        (lists / name).write_text("\n".join([AFFECTNET_HEADER, *(affectnet_line(p, c) for p, c in rows)]) + "\n")
    for seed, (path, code) in enumerate(AFFECTNET_TRAIN + AFFECTNET_VALIDATION):
        if path not in (AFFECTNET_MISSING, AFFECTNET_CORRUPT):
            write_face(root / "Manually_Annotated_Images" / path, _AFFECTNET_DEMO[code], seed)
    write_corrupt(root / "Manually_Annotated_Images" / AFFECTNET_CORRUPT)
    return root


# ---- FER+ ----------------------------------------------------------------------------------------------------------

# folder -> (image, the ten votes: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF)
FERPLUS_VOTES = {
    "FER2013Train": (("fer0000000.png", "4,0,0,1,3,2,0,0,0,0"),    # 4 of 9 kept votes: no majority
                     ("fer0000001.png", "0,10,0,0,0,0,0,0,0,0"),   # happy
                     ("fer0000002.png", "2,0,0,8,0,0,0,0,0,0"),    # sad
                     ("fer0000003.png", "1,0,0,0,0,0,0,0,8,1"),    # unknown
                     ("fer0000004.png", "0,0,0,0,0,0,0,0,2,8"),    # not a face
                     ("fer0000005.png", "5,0,0,5,0,0,0,0,0,0"),    # a tie: no majority
                     ("fer0000006.png", "1,0,0,0,0,0,0,9,0,0"),    # contempt
                     ("fer0000007.png", "x,0,0,0,0,0,0,9,0,0"),    # unreadable votes
                     ("fer0000008.png", "0,0,0,0,9,1,0,0,0,0")),   # angry, image missing
    "FER2013Valid": (("fer0028710.png", "0,1,9,0,0,0,0,0,0,0"),),  # surprise (written without the box column)
    "FER2013Test": (("fer0032220.png", "0,0,0,0,2,1,0,7,0,0"),     # contempt: the single disgust vote is dropped
                    ("fer0032222.png", "3,0,0,5,0,0,0,0,2,0"),     # 5 of 10: no majority
                    ("fer0032223.png", "6,0,1,2,0,0,0,0,1,0")),    # neutral, image corrupt
}
FERPLUS_BAD_VOTES, FERPLUS_MISSING, FERPLUS_CORRUPT = "fer0000007", "fer0000008", "fer0032223"
_FERPLUS_DEMO = ("neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "disgust", "neutral", "neutral")


def make_ferplus(root: Path) -> Path:
    for folder, rows in FERPLUS_VOTES.items():
        lines = []
        for seed, (image, votes) in enumerate(rows):
            box = "" if folder == "FER2013Valid" else '"(0, 0, 48, 48)",'
            lines.append(f"{image},{box}{votes}")
            counts = [int(v) if v.isdigit() else 0 for v in votes.split(",")]
            if Path(image).stem not in (FERPLUS_MISSING, FERPLUS_CORRUPT):
                write_face(root / folder / image, _FERPLUS_DEMO[int(np.argmax(counts))], seed, (48, 48), gray=True)
        (root / folder / "label.csv").write_text("\n".join(lines) + "\n")
    write_corrupt(root / "FER2013Test" / f"{FERPLUS_CORRUPT}.png")
    return root


# ---- Oulu-CASIA ----------------------------------------------------------------------------------------------------

OULU_EXPRESSIONS = {"Anger": "angry", "Disgust": "disgust", "Fear": "fear", "Happiness": "happy", "Sadness": "sad",
                    "Surprise": "surprise"}
OULU_SUBJECTS = ("P001", "P002", "P003")
OULU_FRAMES = 5                     # per sequence, 000.jpeg .. 004.jpeg
OULU_UNKNOWN = "VL/Strong/P002/Contempt"
OULU_EMPTY = "VL/Strong/P003/Fear"
OULU_CORRUPT = "VL/Strong/P001/Sadness/004"


def write_sequence(folder: Path, label: str, seed: int, frames: int = OULU_FRAMES, gray: bool = False) -> None:
    """`frames` images 000.jpeg .. of one demo clip, in order."""
    for i in range(frames):
        write_face(folder / f"{i:03d}.jpeg", label, seed, frame=i, frames=frames, gray=gray)


def make_oulu(root: Path) -> Path:
    base = root / "OriginalImg"
    for seed, subject in enumerate(OULU_SUBJECTS):
        for expression, label in OULU_EXPRESSIONS.items():
            folder = base / "VL" / "Strong" / subject / expression
            if f"VL/Strong/{subject}/{expression}" == OULU_EMPTY:
                folder.mkdir(parents=True)
                continue
            write_sequence(folder, label, seed)
    write_sequence(base / "VL" / "Strong" / "P002" / "Contempt", "disgust", 9)
    write_corrupt(base / f"{OULU_CORRUPT}.jpeg")
    for expression, label in OULU_EXPRESSIONS.items():
        write_sequence(base / "NI" / "Strong" / "P001" / expression, label, 0, frames=3, gray=True)
    return root


# ---- NVIE ----------------------------------------------------------------------------------------------------------

NVIE_IMAGES = {     # (illumination, subject, expression) -> apex images
    ("Front", "001", "Happiness"): 2, ("Front", "001", "Disgust"): 1, ("Front", "002", "Fear"): 1,
    ("Left", "001", "Happiness"): 1, ("Left", "003", "Surprise"): 1, ("Left", "003", "Neutral"): 1,
}
NVIE_UNKNOWN = "Posed/Infrared/Left/003/Neutral"


def thermal(path: Path, label: str, seed: int) -> Path:
    """A one-channel image with the face's gray levels inverted, the false contrast of a thermal camera."""
    write_face(path, label, seed, gray=True)
    cv2.imwrite(str(path), 255 - cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    return path


def make_nvie(root: Path) -> Path:
    for seed, ((light, subject, expression), count) in enumerate(NVIE_IMAGES.items()):
        label = OULU_EXPRESSIONS.get(expression, "neutral")
        for i in range(count):
            thermal(root / "Posed" / "Infrared" / light / subject / expression / f"{subject}_{i + 1}.bmp", label, seed)
    (root / "Posed" / "Infrared" / "Right").mkdir(parents=True)
    return root
