"""Still-image datasets: label sets, adapters on tiny trees in each official layout (tests/image_dataset_fixtures.py),
and single images through the real frames and faces stages."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

import image_dataset_fixtures as F
from affectprep import labels as L
from affectprep.config import DatasetConfig, ProjectConfig
from affectprep.pipeline.dag import ensure_index, plan_stages, run_pipeline
from affectprep.pipeline.datasets import DatasetError, build_index, make_adapter
from affectprep.pipeline.datasets.ferplus import majority

IMAGE_KINDS = ("rafdb", "affectnet", "ferplus", "oulu", "nvie")


def index(kind, root, **options):
    table = build_index(kind, root, options)
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows, "sample ids must be unique"
    return table, rows


def ok(rows):
    return {k: r for k, r in rows.items() if r["status"] == "ok"}


def excluded(table):
    return json.loads(table.schema.metadata[b"affectprep.excluded"])


# ---- label sets ----------------------------------------------------------------------------------------------------

def test_rafdb_codes_map_by_name_into_basic7():
    expected = {"1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry", "7": "neutral"}
    assert {code: L.BASIC7[L.rafdb_index(code)] for code in expected} == expected
    with pytest.raises(L.UnknownLabel, match=r"unknown label '0' \(expected 1..7\)"):
        L.rafdb_index("0")


def test_affectnet_seven_classes_are_basic7_and_eight_are_affectnets_own_order():
    assert L.label_set("affectnet8").names == ("neutral", "happy", "sad", "surprise", "fear", "disgust", "angry",
                                               "contempt")
    assert [L.AFFECTNET8[L.affectnet_index(str(c), 8)] for c in range(8)] == list(L.AFFECTNET8)
    assert [L.BASIC7[L.affectnet_index(str(c), 7)] for c in range(7)] == list(L.AFFECTNET8[:7])
    with pytest.raises(L.UnknownLabel, match="expected 0..6"):
        L.affectnet_index("7", 7)       # contempt is outside the 7-class protocol
    with pytest.raises(L.UnknownLabel, match="8 = none"):
        L.affectnet_index("8", 8)


def test_ferplus8_follows_the_vote_columns_and_basic6_drops_neutral():
    assert L.label_set("ferplus8").names == ("neutral", "happy", "surprise", "sad", "angry", "disgust", "fear",
                                             "contempt")
    assert L.FERPLUS_VOTES[8:] == ("unknown", "not-face")
    assert L.label_set("basic6").names == ("happy", "sad", "angry", "surprise", "disgust", "fear")
    nouns = {"Anger": "angry", "disgust": "disgust", "FEAR": "fear", "Happiness": "happy", "Sadness": "sad",
             "Surprise": "surprise"}
    assert {n: L.BASIC6[L.basic6_index(n)] for n in nouns} == nouns
    with pytest.raises(L.UnknownLabel, match="unknown label 'Neutral'"):
        L.basic6_index("Neutral")


def test_ferplus_majority_is_the_official_rule():
    # single votes are outliers and dropped; the winner needs more than half of the rest
    assert majority([0, 0, 0, 0, 2, 1, 0, 7, 0, 0]) == 7            # 7 of 9 after dropping the single disgust vote
    assert majority([4, 0, 0, 1, 3, 2, 0, 0, 0, 0]) is None         # 4 of 9
    assert majority([3, 0, 0, 5, 0, 0, 0, 0, 2, 0]) is None         # exactly half is not a majority
    assert majority([5, 1, 1, 1, 1, 1, 0, 0, 0, 0]) == 0            # 5 of 10 votes, but 5 of 5 once singles go
    assert majority([0, 0, 0, 0, 0, 0, 0, 0, 9, 1]) == 8            # unknown wins: the adapter leaves it out
    assert majority([0] * 10) is None


# ---- adapters --------------------------------------------------------------------------------------------------------

def test_every_image_kind_refuses_a_root_without_its_layout(tmp_path):
    for kind in IMAGE_KINDS:
        with pytest.raises(DatasetError, match=f"^{kind}: "):
            make_adapter(kind, tmp_path, {}).annotation_files()
    with pytest.raises(ValueError, match="not one of"):
        make_adapter("affectnet", tmp_path, {"classes": 6})
    with pytest.raises(ValueError, match="not one of"):
        make_adapter("oulu", tmp_path, {"modality": "IR"})


def test_rafdb_splits_labels_and_image_choice(tmp_path):
    root = F.make_rafdb(tmp_path)
    table, rows = index("rafdb", root)
    assert table.schema.metadata[b"affectprep.label_set"] == b"basic7"
    good = ok(rows)
    assert set(good) == {"train_00001", "train_00002", "test_0001", "test_0002"}
    assert [good[k]["label_name"] for k in sorted(good)] == ["neutral", "surprise", "happy", "angry"]
    assert good["test_0001"]["split"] == "test" and good["train_00001"]["split"] == "train"
    assert all(r["media_kind"] == "image" and r["fold"] == 0 for r in good.values())
    assert good["train_00002"]["media_path"].endswith("Image/aligned/train_00002_aligned.jpg")
    _, original = index("rafdb", root, images="original")
    assert original["train_00002"]["media_path"].endswith("Image/original/train_00002.jpg")
    assert "unknown label '9'" in rows[F.RAFDB_UNKNOWN]["error"]
    assert rows[F.RAFDB_UNKNOWN]["error"].startswith("EmoLabel/list_patition_label.txt line 5: ")
    assert "train_00004_aligned.jpg not found" in rows[F.RAFDB_MISSING]["error"]
    assert "test_0003_aligned.jpg is not a JPEG, PNG or BMP image" in rows[F.RAFDB_CORRUPT]["error"]
    assert rows[F.RAFDB_CORRUPT]["split"] == "test"


def test_affectnet_7_and_8_classes_exclusions_and_validation_as_test(tmp_path):
    root = F.make_affectnet(tmp_path)
    table, rows = index("affectnet", root)
    assert excluded(table) == {"contempt": 1, "none": 1, "uncertain": 1, "no-face": 1}
    good = ok(rows)
    assert {k: (r["label_name"], r["split"]) for k, r in good.items()} == {
        "101/a1.jpg": ("happy", "train"), "101/a2.jpg": ("angry", "train"), "201/d1.jpg": ("surprise", "test")}
    assert all(L.BASIC7[r["label"]] == r["label_name"] for r in good.values())
    assert "unknown label '12'" in rows[F.AFFECTNET_UNKNOWN]["error"]
    assert "103/c3.jpg not found" in rows[F.AFFECTNET_MISSING]["error"]
    assert "is not a JPEG, PNG or BMP image" in rows[F.AFFECTNET_CORRUPT]["error"]
    assert rows[F.AFFECTNET_CORRUPT]["error"].startswith("Manually_Annotated_file_lists/validation.csv line 4: ")

    table, rows = index("affectnet", root, classes=8)
    assert table.schema.metadata[b"affectprep.label_set"] == b"affectnet8"
    assert excluded(table) == {"none": 1, "uncertain": 1, "no-face": 1}
    assert rows["102/b1.jpg"]["label_name"] == "contempt" and rows["102/b1.jpg"]["label"] == 7
    assert rows["101/a2.jpg"]["label"] == L.AFFECTNET8.index("angry") == 6


def test_affectnet_header_names_the_columns(tmp_path):
    root = F.make_affectnet(tmp_path)
    csv = root / "Manually_Annotated_file_lists" / "training.csv"
    lines = csv.read_text().splitlines()
    # columns found by name, wherever they are
    header = lines[0].split(",")
    order = [header.index("expression"), *(i for i in range(len(header)) if header[i] != "expression")]
    csv.write_text("\n".join(",".join(line.split(",")[i] for i in order) for line in lines) + "\n")
    _, rows = index("affectnet", root)
    assert rows["101/a1.jpg"]["label_name"] == "happy" and rows["101/a2.jpg"]["label_name"] == "angry"
    csv.write_text("\n".join(["path,expression", *lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match="training.csv has no column subDirectory_filePath"):
        build_index("affectnet", root, {})


def test_ferplus_majority_labels_splits_and_bad_rows(tmp_path):
    root = F.make_ferplus(tmp_path)
    table, rows = index("ferplus", root)
    assert excluded(table) == {"no-majority": 3, "unknown": 1, "not-face": 1}
    good = ok(rows)
    assert {k: (r["label_name"], r["split"]) for k, r in good.items()} == {
        "fer0000001": ("happy", "train"), "fer0000002": ("sad", "train"), "fer0000006": ("contempt", "train"),
        "fer0028710": ("surprise", "val"), "fer0032220": ("contempt", "test")}
    assert good["fer0028710"]["media_path"].endswith("FER2013Valid/fer0028710.png")   # a line without the box
    assert "vote counts must be whole numbers" in rows[F.FERPLUS_BAD_VOTES]["error"]
    assert "FER2013Train/fer0000008.png not found" in rows[F.FERPLUS_MISSING]["error"]
    assert "fer0032223.png is not a JPEG, PNG or BMP image" in rows[F.FERPLUS_CORRUPT]["error"]
    assert len(rows) == 5 + 3


def test_oulu_last_frames_of_each_sequence_and_subject_folds(tmp_path):
    root = F.make_oulu(tmp_path)
    table, rows = index("oulu", root)
    assert table.schema.metadata[b"affectprep.label_set"] == b"basic6"
    good = ok(rows)
    # 3 subjects x 6 expressions x the last 3 of 5 frames, less the empty sequence and the corrupt frame
    assert len(good) == 3 * 6 * 3 - 3 - 1
    assert {k.rsplit("/", 1)[1] for k in good} == {"002", "003", "004"}
    anger = good["VL/Strong/P002/Anger/004"]
    assert anger["label_name"] == "angry" and anger["subject"] == "P002" and anger["media_kind"] == "image"
    assert anger["media_path"].endswith("OriginalImg/VL/Strong/P002/Anger/004.jpeg")
    assert {r["subject"]: r["fold"] for r in good.values()} == {"P001": 1, "P002": 4, "P003": 7}
    assert "unknown label 'Contempt'" in rows[F.OULU_UNKNOWN]["error"]
    assert "holds no images" in rows[F.OULU_EMPTY]["error"]
    assert "is not a JPEG, PNG or BMP image" in rows[F.OULU_CORRUPT]["error"]
    assert rows[F.OULU_CORRUPT]["fold"] == 1 and rows[F.OULU_CORRUPT]["label"] == L.BASIC6.index("sad")

    _, rows = index("oulu", root, peak_frames=0, folds=3)
    assert len(ok(rows)) == 3 * 6 * 5 - 5 - 1
    assert {r["subject"]: r["fold"] for r in ok(rows).values()} == {"P001": 1, "P002": 2, "P003": 3}
    _, rows = index("oulu", root, modality="NI", peak_frames=1)
    assert sorted(ok(rows)) == [f"NI/Strong/P001/{e}/002" for e in sorted(F.OULU_EXPRESSIONS)]
    with pytest.raises(DatasetError, match="oulu: image folder OriginalImg/VL/Dark not found"):
        build_index("oulu", root, {"lighting": "Dark"})


def test_nvie_illuminations_and_folds_per_subject(tmp_path):
    root = F.make_nvie(tmp_path)
    table, rows = index("nvie", root)
    good = ok(rows)
    assert len(good) == 6 and table.schema.metadata[b"affectprep.label_set"] == b"basic6"
    happy = good["Posed/Infrared/Left/001/Happiness/001_1"]
    assert happy["label_name"] == "happy" and happy["media_path"].endswith(".bmp")
    # one fold per subject, whatever the lamp: 001 is lit from the front and the left
    folds = {(r["subject"], r["sample_id"].split("/")[2]): r["fold"] for r in good.values()}
    assert folds[("001", "Front")] == folds[("001", "Left")] == 1 and folds[("002", "Front")] == 4
    assert "unknown label 'Neutral'" in rows[F.NVIE_UNKNOWN]["error"]
    _, rows = index("nvie", root, illuminations=["Front"])
    assert {k.split("/")[2] for k in rows} == {"Front"} and len(rows) == 4
    shutil.rmtree(root / "Posed" / "Infrared" / "Right")
    with pytest.raises(DatasetError, match="nvie: image folder Posed/Infrared/Right not found"):
        build_index("nvie", root, {})
    flat = tmp_path / "flat"
    shutil.copytree(root / "Posed" / "Infrared" / "Front", flat / "Posed" / "Visible")
    _, rows = index("nvie", flat, modality="Visible", illuminations=[])
    assert sorted(rows) == ["Posed/Visible/001/Disgust/001_1", "Posed/Visible/001/Happiness/001_1",
                            "Posed/Visible/001/Happiness/001_2", "Posed/Visible/002/Fear/002_1"]


# ---- single images through the real DAG ------------------------------------------------------------------------------

def run_faces(tmp_path, kind, root, options=None, faces=None):
    project = ProjectConfig(None, tmp_path / "cache", {kind: DatasetConfig(kind, kind, root, options or {})},
                            {"faces": {"backend": "haar", **(faces or {})}})
    report = run_pipeline(project, "faces", scheduler="inline", progress=False)
    index_store = ensure_index(project, project.datasets[kind])
    stores = {p.stage.name: p.store for p in plan_stages(project, index_store, "faces")}
    return report, index_store, stores


def test_rafdb_photos_become_one_aligned_crop_each(tmp_path):
    root = F.make_rafdb(tmp_path / "RAF")
    F.truncate(root / "Image" / "original" / "test_0002.jpg")
    report, index_store, stores = run_faces(tmp_path, "rafdb", root, {"images": "original"})
    assert [s.stage for s in report.stages] == ["frames", "faces"]
    frames = {r["sample_id"]: r for r in stores["frames"].read().to_pylist()}
    assert frames["train_00001"]["frame_indices"] == [0] and frames["train_00001"]["decoder"] == "image"
    assert (frames["train_00001"]["width"], frames["train_00001"]["height"]) == (160, 120)
    assert "unreadable image test_0002.jpg" in frames["test_0002"]["error"]
    faces = {r["sample_id"]: r for r in stores["faces"].read().to_pylist()}
    assert set(faces) == {"train_00001", "train_00002", "test_0001"}
    for row in faces.values():
        assert row["status"] == "ok" and row["detected"] == [True] and row["frames_per_view"] == 1
        crop = cv2.imdecode(np.frombuffer(row["crops"][0], np.uint8), cv2.IMREAD_COLOR)
        assert crop.shape == (224, 224, 3) and len(row["crops"]) == 1
        landmarks = np.array(row["landmarks"][0]).reshape(68, 2)
        assert (landmarks > 0).all() and (landmarks < 224).all()
    index_failed = index_store.read(["sample_id"], status="failed").column("sample_id").to_pylist()
    assert sorted(index_failed) == sorted([F.RAFDB_UNKNOWN, F.RAFDB_MISSING, F.RAFDB_CORRUPT])
    assert report.failed == 3 + 1


def test_ferplus_48px_grayscale_faces_centre_crop(tmp_path):
    root = F.make_ferplus(tmp_path / "FERPlus")
    report, _, stores = run_faces(tmp_path, "ferplus", root, faces={"no_face": "center_crop"})
    faces = stores["faces"].read(status="ok").to_pylist()
    assert len(faces) == 5 and report.stages[-1].failed == 0
    for row in faces:
        crop = cv2.imdecode(np.frombuffer(row["crops"][0], np.uint8), cv2.IMREAD_COLOR)
        assert crop.shape == (224, 224, 3) and len(row["landmarks"][0]) == 136
        # a grayscale source stays gray through decoding, alignment and JPEG
        assert np.abs(crop.astype(int) - crop[..., :1]).max() <= 12
