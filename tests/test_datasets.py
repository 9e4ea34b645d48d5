"""Dataset adapters and canonical label sets, on tiny trees in each official layout (tests/dataset_fixtures.py)."""
from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pytest

import dataset_fixtures as F
from affectprep import labels as L
from affectprep import schema
from affectprep.pipeline.datasets import ADAPTERS, DatasetError, build_index, make_adapter, options_for
from affectprep.pipeline.dag import resolve_media
from affectprep.pipeline.stages.frames import FramesConfig, FramesStage


def index(kind, root, **options):
    table = build_index(kind, root, options)
    rows = table.to_pylist()
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)), "sample ids must be unique"
    return table, {r["sample_id"]: r for r in rows}


def ok(rows):
    return {k: r for k, r in rows.items() if r["status"] == "ok"}


def failed(rows):
    return {k: r for k, r in rows.items() if r["status"] == "failed"}


def errors(rows):
    return [r["error"] for r in failed(rows).values()]


# ---- label sets ----------------------------------------------------------------------------------------------------

def test_dfew_codes_map_to_basic7_in_the_official_order():
    assert L.label_set("basic7").names == ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
    expected = {"1": "happy", "2": "sad", "3": "neutral", "4": "angry", "5": "surprise", "6": "disgust", "7": "fear"}
    for code, name in expected.items():
        assert L.BASIC7[L.dfew_index(code)] == name
    with pytest.raises(L.UnknownLabel, match=r"unknown label '8' \(expected 1..7\)"):
        L.dfew_index("8")


def test_ferv39k_maps_by_name_never_by_number():
    for name in ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear"):
        assert L.BASIC7[L.ferv39k_index(name)] == name.lower()
    for bad in ("3", "Happiness", ""):
        with pytest.raises(L.UnknownLabel):
            L.ferv39k_index(bad)


def test_mafw_names_single_and_compound():
    spelled = {"anger": "angry", "disgust": "disgust", "fear": "fear", "happiness": "happy", "neutral": "neutral",
               "sadness": "sad", "surprise": "surprise", "contempt": "contempt", "anxiety": "anxiety",
               "helplessness": "helplessness", "disappointment": "disappointment"}
    # MAFW's own numbering 1..11 is the canonical order
    assert [L.MAFW11[L.mafw_index(n)] for n in spelled] == list(L.MAFW11) == list(spelled.values())
    compound = L.label_set("mafw43")
    assert len(compound) == 43 and len(set(compound.names)) == 43
    assert compound.names[:11] == L.MAFW11
    index43, parts = L.mafw_compound("sadness_helplessness")
    assert compound.names[index43] == "sad_helplessness" and parts == (5, 9)
    assert L.mafw_compound("helplessness_sadness") == (index43, parts)      # order inside a compound is irrelevant
    assert L.mafw_compound("fear") == (2, (2,))
    with pytest.raises(L.UnknownLabel, match="compound label"):
        L.mafw_index("anger_disgust")
    with pytest.raises(L.UnknownLabel, match="not one of MAFW's 43"):
        L.mafw_compound("happiness_anxiety")
    with pytest.raises(L.UnknownLabel):
        L.mafw_index("angry")       # canonical spelling is not MAFW's


def test_iemocap_excited_is_happy_and_excluded_codes_are_not_labels():
    assert L.label_set("iemocap4").names == ("neutral", "happy", "angry", "sad")
    assert L.iemocap_index("exc") == L.iemocap_index("hap") == 1
    assert {"fru", "sur", "fea", "dis", "oth", "xxx"} == L.IEMOCAP_EXCLUDED
    with pytest.raises(L.UnknownLabel):
        L.iemocap_index("fru")


def test_au_sets():
    bp4d, disfa = L.label_set("bp4d12"), L.label_set("disfa8")
    assert bp4d.is_au and bp4d.au_ids == (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
    assert disfa.au_ids == (1, 2, 4, 6, 9, 12, 25, 26) and disfa.names[-1] == "AU26"
    assert not L.label_set("basic7").is_au
    with pytest.raises(KeyError, match="unknown label set"):
        L.label_set("basic8")


# ---- registry, options, table --------------------------------------------------------------------------------------

def test_every_kind_is_registered_with_default_options():
    assert set(ADAPTERS) == {"dfew", "ferv39k", "mafw", "bp4d", "disfa", "iemocap", "csv", "rafdb", "affectnet",
                             "ferplus", "oulu", "nvie"}
    assert options_for("dfew").media == "Clip/original"
    assert options_for("bp4d").window == 16 and options_for("disfa").threshold == 2


def test_bad_options_and_missing_annotations_are_one_line_errors(tmp_path):
    root = F.make_dfew(tmp_path / "dfew")
    with pytest.raises(ValueError, match="unknown option.*'medai'") as e:
        build_index("dfew", root, {"medai": "x"})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="expected int"):
        make_adapter("bp4d", root, {"window": "big"})
    with pytest.raises(ValueError, match="must be >= 1"):
        make_adapter("bp4d", root, {"window": 0})
    with pytest.raises(ValueError, match="video_name must contain"):
        make_adapter("disfa", root, {"video_name": "LeftVideo{id}.avi"})
    with pytest.raises(ValueError, match="not one of"):
        make_adapter("mafw", root, {"task": "multi"})
    with pytest.raises(ValueError, match="unknown dataset kind"):
        build_index("afew", root, {})
    os.remove(F.dfew_test_csv(root, 3))
    with pytest.raises(DatasetError, match=r"set_3.csv not found"):
        build_index("dfew", root, {})
    with pytest.raises(DatasetError, match="media folder"):
        build_index("ferv39k", F.make_ferv39k(tmp_path / "ferv"), {"media": "nowhere"})
    (tmp_path / "empty").mkdir()
    for kind in ADAPTERS:
        with pytest.raises(DatasetError, match=f"^{kind}: "):
            make_adapter(kind, tmp_path / "empty", {}).annotation_files()
    with pytest.raises(DatasetError, match="not a folder"):
        build_index("dfew", tmp_path / "missing", {})


def test_table_has_the_index_schema_and_label_metadata(tmp_path):
    table, _ = index("dfew", F.make_dfew(tmp_path))
    assert table.schema.equals(schema.INDEX, check_metadata=False)
    meta = table.schema.metadata
    assert meta[b"affectprep.stage"] == b"index"
    assert meta[b"affectprep.label_set"] == b"basic7"
    assert json.loads(meta[b"affectprep.label_names"]) == list(L.BASIC7)
    assert json.loads(meta[b"affectprep.excluded"]) == {}


# ---- DFEW ----------------------------------------------------------------------------------------------------------

def test_dfew_labels_folds_and_media(tmp_path):
    root = F.make_dfew(tmp_path, padded_names=False)      # videos named 1.mp4 as in the original release
    _, rows = index("dfew", root)
    names = {1: "happy", 2: "sad", 3: "neutral", 4: "angry", 5: "surprise", 6: "disgust", 7: "fear"}
    assert set(rows) == {f"{c:05d}" for c in names}
    for clip, name in names.items():
        row = rows[f"{clip:05d}"]
        assert row["status"] == "ok" and row["error"] is None
        assert row["label_name"] == name and L.BASIC7[row["label"]] == name and row["labels"] == [row["label"]]
        assert row["fold"] == F.dfew_fold(clip) and row["split"] is None
        assert row["media_kind"] == "video" and row["media_path"] == f"Clip/original/{clip}.mp4"  # relative to the root
        assert (row["frame_start"], row["frame_end"]) == (0, -1)


def test_dfew_frame_folders(tmp_path):
    root = F.make_dfew(tmp_path, frames=True)
    for image in (root / "Clip/clip_224x224/00003").iterdir():
        image.unlink()
    _, rows = index("dfew", root, media="Clip/clip_224x224")
    assert len(ok(rows)) == 6
    assert all(r["media_kind"] == "frames" and os.path.isdir(root / r["media_path"]) for r in ok(rows).values())
    assert rows["00003"]["error"].endswith("frame folder Clip/clip_224x224/00003 holds no images")


def test_a_media_folder_kept_elsewhere_is_followed(tmp_path):
    """A symlinked (or absolute) media folder is the user's choice; only paths escaping it are refused."""
    root = F.make_dfew(tmp_path / "dfew")
    (tmp_path / "disk").mkdir()
    (root / "Clip/original").rename(tmp_path / "disk/original")
    (root / "Clip/original").symlink_to(tmp_path / "disk/original")
    _, rows = index("dfew", root)
    assert len(ok(rows)) == 7 and rows["00001"]["media_path"] == str(tmp_path / "disk/original/00001.mp4")
    _, rows = index("dfew", root, media=str(tmp_path / "disk/original"))
    assert len(ok(rows)) == 7


def test_dfew_bad_rows_fail_readably_and_good_rows_survive(tmp_path):
    root = F.make_dfew(tmp_path)
    csv = F.dfew_test_csv(root, 1)
    first_bad = F.line_count(csv) + 1
    outside = tmp_path.parent / f"{tmp_path.name}_secret.mp4"
    outside.write_bytes(b"secret")
    (root / "Clip/original/00012.mp4").symlink_to(outside)
    (root / "Clip/original/00011.mp4").write_bytes(b"")
    F.append_lines(csv, ["8,9",          # unknown label code
                         "9",            # wrong column count
                         "10,x",         # non-integer label
                         "abc,1",        # non-integer clip name
                         "1,1",          # duplicate of clip 1
                         "11,2",         # zero-byte media
                         "12,3",         # symlink escaping the dataset
                         "13,4",         # no media at all
                         "14,\x003"])    # a NUL byte
    _, rows = index("dfew", root)
    where = "EmoLabel_DataSplit/test(single-labeled)/set_1.csv line"
    assert rows["00008"]["error"] == f"{where} {first_bad}: unknown label '9' (expected 1..7)"
    assert rows[f"EmoLabel_DataSplit/test(single-labeled)/set_1.csv:{first_bad + 1}"]["error"] == \
        f"{where} {first_bad + 1}: expected 2 columns (video_name,label), got 1"
    assert rows["00010"]["error"] == f"{where} {first_bad + 2}: unknown label 'x' (expected 1..7)"
    assert "video_name 'abc' is not a clip number" in rows[f"EmoLabel_DataSplit/test(single-labeled)/set_1.csv:"
                                                          f"{first_bad + 3}"]["error"]
    duplicate = rows[f"EmoLabel_DataSplit/test(single-labeled)/set_1.csv:{first_bad + 4}"]["error"]
    assert "duplicate sample id '00001' (first listed at EmoLabel_DataSplit/test(single-labeled)/set_1.csv line 2)" \
        in duplicate
    assert rows["00011"]["error"].endswith("media file Clip/original/00011.mp4 is empty (0 bytes)")
    assert "resolves outside Clip/original" in rows["00012"]["error"]
    assert "no video or frame folder named '00013' in Clip/original" in rows["00013"]["error"]
    assert "unknown label '\x003'" in rows["00014"]["error"]
    assert len(failed(rows)) == 9 and all(e.startswith(where) for e in errors(rows))
    assert all(rows[f"{c:05d}"]["status"] == "ok" for c in range(1, 8))
    assert rows["00008"]["fold"] == 1 and rows["00008"]["label"] is None


# ---- FERV39k -------------------------------------------------------------------------------------------------------

def test_ferv39k_split_by_name_and_frame_folders(tmp_path):
    root = F.make_ferv39k(tmp_path)
    F.append_lines(root / "4_setups/All_scenes/test_All.csv", ["War/Happy/0099 Happiness", "War/Sad/0100",
                                                               "../../../etc/passwd Sad"])
    _, rows = index("ferv39k", root)
    for scene, emotion, clip in F.FERV39K_CLIPS:
        row = rows[f"{scene}/{emotion}/{clip}"]
        assert row["status"] == "ok" and row["label_name"] == emotion.lower()
        assert row["split"] == ("train" if (scene, emotion, clip) in F.FERV39K_CLIPS[:5] else "test")
        assert row["fold"] == 0 and row["media_kind"] == "frames"
        assert row["media_path"] == f"2_ClipsforFaceCrop/{scene}/{emotion}/{clip}"
    assert "unknown label 'Happiness'" in rows["War/Happy/0099"]["error"]
    assert rows["4_setups/All_scenes/test_All.csv:4"]["error"] == \
        "4_setups/All_scenes/test_All.csv line 4: expected 2 fields (Scene/Emotion/id EmotionName), got 1"
    assert "resolves outside 2_ClipsforFaceCrop" in rows["../../../etc/passwd"]["error"]


# ---- MAFW ----------------------------------------------------------------------------------------------------------

def test_mafw_single_names_and_folds(tmp_path):
    root = F.make_mafw(tmp_path)
    F.append_lines(root / "Train_Test_Set/single/no_caption_new/set_2/test.txt",
                   ["00020.mp4 anger_disgust", "00021.mp4 happy"])
    table, rows = index("mafw", root)
    assert table.schema.metadata[b"affectprep.label_set"] == b"mafw11"
    spelled = dict(zip(F.MAFW_SINGLE, L.MAFW11))
    for i, name in enumerate(F.MAFW_SINGLE, start=1):
        row = rows[f"{i:05d}"]
        assert row["status"] == "ok" and row["label_name"] == spelled[name] and row["fold"] == (i - 1) % 5 + 1
        assert row["transcript"] is None and row["media_path"].endswith(f"data/clips/{i:05d}.mp4")
    assert "compound label 'anger_disgust'" in rows["00020"]["error"]
    assert rows["00021"]["error"].startswith("Train_Test_Set/single/no_caption_new/set_2/test.txt line 4: "
                                             "unknown label 'happy'")
    assert rows["00021"]["fold"] == 2


def test_mafw_compound_with_captions_in_the_older_layout(tmp_path):
    root = F.make_mafw(tmp_path, F.MAFW_COMPOUND, task="compound", captions="with", layout="old")
    table, rows = index("mafw", root, task="compound", captions="with")
    assert table.schema.metadata[b"affectprep.label_set"] == b"mafw43"
    compound = L.label_set("mafw43")
    expected = {"00001": ("angry_disgust", [0, 1]), "00002": ("sad_helplessness", [5, 9]),
                "00003": ("fear_surprise_anxiety", [2, 6, 8]), "00004": ("happy", [3]), "00005": ("fear", [2])}
    for sample_id, (name, parts) in expected.items():
        row = rows[sample_id]
        assert row["status"] == "ok" and compound.names[row["label"]] == name == row["label_name"]
        assert row["labels"] == parts
        assert row["transcript"] == F.mafw_caption(f"{sample_id}.mp4")     # English caption, GB18030 file decoded


def test_mafw_missing_split_folder_names_both_layouts(tmp_path):
    with pytest.raises(DatasetError, match="Train_Test_Set/compound/no_caption_new or Train & Test Set"):
        build_index("mafw", F.make_mafw(tmp_path), {"task": "compound"})


# ---- BP4D ----------------------------------------------------------------------------------------------------------

def test_bp4d_au_vectors_windows_and_folds(tmp_path):
    root = F.make_bp4d(tmp_path)
    table, rows = index("bp4d", root)
    assert table.schema.metadata[b"affectprep.label_set"] == b"bp4d12"
    assert len(ok(rows)) == 60
    row = rows["F001_T1_7"]
    assert row["subject"] == "F001" and row["label"] == -1 and row["media_kind"] == "frames"
    assert row["media_path"] == "Sequences/F001/T1"
    for a, value in zip(L.BP4D_AUS, row["au"]):
        code = F.bp4d_value("F001", "T1", 7, a)
        assert math.isnan(value) if code == "9" else value == float(code)
    assert math.isnan(row["au"][1])     # AU2 not coded on frame 7
    # frame 7 is image 6 = position 6 of 20: a 16-frame window centred on it, reaching 2 frames before the folder
    assert (row["frame_start"], row["frame_end"]) == (-2, 14)
    assert (rows["F001_T1_12"]["frame_start"], rows["F001_T1_12"]["frame_end"]) == (3, 19)
    assert (rows["F001_T1_20"]["frame_start"], rows["F001_T1_20"]["frame_end"]) == (11, 27)
    # standard subject folds (ME-GraphAU numbering: fold 3 tests the part holding F001)
    assert rows["F001_T1_1"]["fold"] == 3 and rows["F007_T2_1"]["fold"] == 1 and rows["M011_T1_1"]["fold"] == 2


def test_bp4d_labelled_frame_is_the_centre_of_its_sampled_clip_up_to_the_sequence_ends(tmp_path):
    """SSM Eqs. 4-5 read the AUs of the clip's centre frame floor(16 / 2): the frames stage must put the labelled
    frame there for every labelled frame, the first and last included, repeating the edge frames to fill in."""
    root = F.make_bp4d(tmp_path, sequences=(("F001", "T1"),))
    _, rows = index("bp4d", root)
    stage = FramesStage(FramesConfig())
    rows = {sample_id: resolve_media(row, str(root)) for sample_id, row in rows.items()}
    for frame in range(1, 21):
        sampled = stage.process_one(rows[f"F001_T1_{frame}"])
        indices = sampled["frame_indices"]
        assert len(indices) == 16 and indices[16 // 2] == frame - 1, (frame, indices)   # image = frame - 1
        assert indices == sorted(indices) and sampled["padded"] == (not 8 <= frame - 1 <= 12)
    assert stage.process_one(rows["F001_T1_1"])["frame_indices"] == [0] * 9 + list(range(1, 8))


def test_an_adapter_version_keys_its_index_so_changed_rows_are_not_served_old_frames(tmp_path, monkeypatch):
    from affectprep.config import DatasetConfig, ProjectConfig
    from affectprep.pipeline.planner import index_store
    from affectprep.pipeline.datasets.bp4d import BP4D

    dataset = DatasetConfig("bp4d", "bp4d", F.make_bp4d(tmp_path / "BP4D", sequences=(("F001", "T1"),)))
    project = ProjectConfig(None, tmp_path / "cache", {"bp4d": dataset})
    assert BP4D.version == 2
    key = index_store(project, dataset)[0].key
    monkeypatch.setattr(BP4D, "version", 1)
    before = index_store(project, dataset)
    assert before[0].key != key and "adapter_version" not in before[2]   # version 1 keeps the keys of old indexes


def test_bp4d_stride_window_and_bad_frames(tmp_path):
    root = F.make_bp4d(tmp_path, sequences=(("F001", "T1"),))
    csv = root / "AUCoding/AU_OCC/F001_T1.csv"
    F.append_lines(csv, ["21," + ",".join(["1"] * 13),       # no image 20
                         "22," + ",".join(["2"] * 13)])      # not an occurrence code
    _, rows = index("bp4d", root, frame_stride=4, window=4)
    assert sorted(int(k.rsplit("_", 1)[1]) for k in ok(rows)) == [1, 5, 9, 13, 17]
    assert (rows["F001_T1_9"]["frame_start"], rows["F001_T1_9"]["frame_end"]) == (6, 10)
    assert "F001_T1_21" in rows and "F001_T1_22" not in rows           # stride also applies to bad lines
    assert "no image numbered 20 in Sequences/F001/T1" in rows["F001_T1_21"]["error"]
    _, rows = index("bp4d", root)
    assert "AU1 value '2' (expected 0, 1 or 9 = not coded)" in rows["F001_T1_22"]["error"]
    assert rows["F001_T1_22"]["subject"] == "F001"


def test_bp4d_missing_au_column_and_missing_sequence(tmp_path):
    root = F.make_bp4d(tmp_path, sequences=(("F001", "T1"), ("M001", "T3")))
    csv = root / "AUCoding/AU_OCC/F001_T1.csv"
    csv.write_text(csv.read_text().replace(",24\n", ",25\n", 1))
    for image in (root / "Sequences/M001/T3").iterdir():
        image.unlink()
    _, rows = index("bp4d", root)
    assert rows["AUCoding/AU_OCC/F001_T1.csv:1"]["error"] == \
        "AUCoding/AU_OCC/F001_T1.csv line 1: header has no column for AU 24"
    assert all("Sequences/M001/T3 not found or holds no images" in rows[f"M001_T3_{f}"]["error"] for f in (1, 20))


# ---- DISFA ---------------------------------------------------------------------------------------------------------

def test_disfa_binarised_intensities_windows_and_folds(tmp_path):
    root = F.make_disfa(tmp_path)
    table, rows = index("disfa", root)
    assert table.schema.metadata[b"affectprep.label_set"] == b"disfa8"
    assert len(ok(rows)) == 90
    row = rows["SN003_10"]
    assert row["au"] == [float(F.disfa_intensity("SN003", 10, a) >= 2) for a in L.DISFA_AUS]
    assert row["media_kind"] == "video" and row["media_path"].endswith("Videos_LeftCamera/LeftVideoSN003_comp.avi")
    assert (row["frame_start"], row["frame_end"]) == (1, 17)          # video frame 9 centred, frames 1-based
    assert (rows["SN003_30"]["frame_start"], rows["SN003_30"]["frame_end"]) == (21, 37)   # last frame: the centre
    assert rows["SN001_1"]["fold"] == 3 and rows["SN013_1"]["fold"] == 2 and rows["SN003_1"]["fold"] == 1
    _, strict = index("disfa", root, threshold=4)
    assert strict["SN003_10"]["au"] == [float(F.disfa_intensity("SN003", 10, a) >= 4) for a in L.DISFA_AUS]


def test_disfa_bad_lines_missing_files_and_missing_video(tmp_path):
    root = F.make_disfa(tmp_path, subjects=("SN001", "SN002", "SN003"), frames=5)
    au4 = root / "ActionUnit_Labels/SN001/SN001_au4.txt"
    au4.write_text(au4.read_text().replace("3,", "3;", 1) + "6,9\n5,0\n")
    (root / "ActionUnit_Labels/SN002/SN002_au26.txt").unlink()
    (root / "Videos_LeftCamera/LeftVideoSN003_comp.avi").unlink()
    _, rows = index("disfa", root)
    assert rows["ActionUnit_Labels/SN001/SN001_au4.txt:3"]["error"].endswith("expected 'frame,intensity', got '3;"
                                                                             f"{F.disfa_intensity('SN001', 3, 4)}'")
    assert "intensity 9 (expected 0..5)" in rows["ActionUnit_Labels/SN001/SN001_au4.txt:6"]["error"]
    assert rows["ActionUnit_Labels/SN001/SN001_au4.txt:7"]["error"].endswith("frame 5 is listed twice")
    assert rows["SN001_3"]["status"] == "ok" and math.isnan(rows["SN001_3"]["au"][2])   # AU4 unknown on frame 3
    assert "SN002_au26.txt not found" in rows["SN002"]["error"] and not any(k.startswith("SN002_") for k in rows)
    assert all("LeftVideoSN003_comp.avi not found" in rows[f"SN003_{f}"]["error"] for f in range(1, 6))


# ---- IEMOCAP -------------------------------------------------------------------------------------------------------

def test_iemocap_protocol_transcripts_folds_and_speakers(tmp_path):
    root = F.make_iemocap(tmp_path)
    table, rows = index("iemocap", root)
    assert json.loads(table.schema.metadata[b"affectprep.excluded"]) == {"fru": 2, "xxx": 1}
    assert set(rows) == {"Ses01F_impro01_F000", "Ses01F_impro01_M001", "Ses01F_impro01_M003", "Ses01F_impro01_M005",
                         "Ses02M_script01_1_F000", "Ses02M_script01_1_M001"}
    excited = rows["Ses01F_impro01_M001"]
    assert excited["label_name"] == "happy" and excited["subject"] == "Ses01M" and excited["fold"] == 1
    assert excited["transcript"] == "Yes, hi!" and excited["media_kind"] == "audio"
    assert excited["media_path"].endswith("Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M001.wav")
    assert rows["Ses02M_script01_1_F000"]["subject"] == "Ses02F" and rows["Ses02M_script01_1_F000"]["fold"] == 2
    assert [rows[k]["label_name"] for k in ("Ses01F_impro01_F000", "Ses01F_impro01_M003", "Ses01F_impro01_M005")] \
        == ["neutral", "angry", "sad"]
    table, rows = index("iemocap", root, merge_excited=False)
    assert json.loads(table.schema.metadata[b"affectprep.excluded"]) == {"exc": 1, "fru": 2, "xxx": 1}


def test_iemocap_unknown_code_and_missing_wav(tmp_path):
    root = F.make_iemocap(tmp_path, {"Ses03F_impro02": [("Ses03F_impro02_F000", "hap", "Hi."),
                                                         ("Ses03F_impro02_M001", "joy", "Ho."),
                                                         ("Ses03F_impro02_F002", "sad", "Oh.")]})
    (root / "Session3/sentences/wav/Ses03F_impro02/Ses03F_impro02_F002.wav").unlink()
    _, rows = index("iemocap", root)
    assert rows["Ses03F_impro02_F000"]["status"] == "ok"
    assert rows["Ses03F_impro02_M001"]["error"].startswith(
        "Session3/dialog/EmoEvaluation/Ses03F_impro02.txt line 8: unknown label 'joy'")
    assert "Ses03F_impro02_F002.wav not found" in rows["Ses03F_impro02_F002"]["error"]
    assert rows["Ses03F_impro02_F002"]["fold"] == 3 and rows["Ses03F_impro02_F002"]["subject"] == "Ses03F"


# ---- generic CSV ---------------------------------------------------------------------------------------------------

def test_csv_media_kinds_labels_splits_and_folds(tmp_path):
    root = F.make_csv_dataset(tmp_path)
    table, rows = index("csv", root)
    names = json.loads(table.schema.metadata[b"affectprep.label_names"])
    assert names == ["anger", "calm", "joy"] and table.schema.metadata[b"affectprep.label_set"] == b"csv"
    assert {k: r["media_kind"] for k, r in rows.items()} == {"clips/a.mp4": "video", "clips/b": "frames",
                                                           "images/c.png": "image", "audio/d.wav": "audio"}
    assert [rows[k]["split"] for k in rows] == ["train", "val", "test", None]
    assert [rows[k]["fold"] for k in rows] == [1, 2, 0, 0]
    assert [rows[k]["subject"] for k in rows] == ["s1", "s2", "s1", None]
    assert [names[rows[k]["label"]] for k in rows] == ["joy", "anger", "joy", "calm"]
    _, rows = index("csv", root, labels=["joy", "anger", "calm"])
    assert rows["clips/b"]["label"] == 1 and rows["audio/d.wav"]["label"] == 2


def test_csv_bad_rows(tmp_path):
    root = F.make_csv_dataset(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}_outside.wav"
    F.write_wav(outside)
    (root / "audio/link.wav").symlink_to(outside)
    (root / "audio/empty.wav").write_bytes(b"")
    (root / "notes.txt").write_text("not media")
    F.append_lines(root / "labels.csv", ["../../etc/passwd,joy,train,,",      # line 6
                                         "audio/link.wav,joy,train,,",        # line 7
                                         "audio/empty.wav,joy,train,,",       # line 8
                                         "audio/none.wav,joy,train,,",        # line 9
                                         "notes.txt,joy,train,,",             # line 10
                                         "clips/a.mp4,joy,train,,",           # line 11: duplicate
                                         "audio/d.wav,joy,dev,,",             # line 12: bad split
                                         "audio/x.wav,joy,test,one,two,",     # line 13: column count
                                         "images/c.png,fear,test,,"])         # line 14 (duplicate first)
    with open(root / "labels.csv", "ab") as f:
        f.write(b"audio/d2.wav,j\xffoy,train,,\n")                         # line 15: not UTF-8
        f.write(b"audio/d3.wav," + b"x" * 200_000 + b",train,,\n")          # line 16: beyond the csv field limit
    _, rows = index("csv", root, labels=["joy", "anger", "calm"])
    assert "unknown label 'j\ufffdoy'" in rows["audio/d2.wav"]["error"]
    assert rows["labels.csv:16"]["error"].startswith("labels.csv line 16: cannot parse the line as CSV: field larger")
    assert rows["../../etc/passwd"]["error"] == \
        "labels.csv line 6: path '../../etc/passwd' resolves outside the dataset root"
    assert "resolves outside" in rows["audio/link.wav"]["error"]
    assert rows["audio/empty.wav"]["error"] == "labels.csv line 8: media file audio/empty.wav is empty (0 bytes)"
    assert rows["audio/none.wav"]["error"] == "labels.csv line 9: media file audio/none.wav not found"
    assert "cannot tell the media kind of 'notes.txt'" in rows["notes.txt"]["error"]
    assert "duplicate sample id 'clips/a.mp4' (first listed at labels.csv line 2)" in rows["labels.csv:11"]["error"]
    assert "split 'dev' (expected train, val, test or empty)" in rows["labels.csv:12"]["error"]
    assert "expected 5 columns" in rows["labels.csv:13"]["error"]
    assert "duplicate" in rows["labels.csv:14"]["error"]
    assert len(ok(rows)) == 4


def test_csv_header_must_name_the_required_columns(tmp_path):
    root = F.make_csv_dataset(tmp_path)
    (root / "labels.csv").write_text("file,label\nclips/a.mp4,joy\n")
    with pytest.raises(DatasetError, match="no column.*path, split"):
        build_index("csv", root, {})


def test_index_rows_round_trip_through_parquet(tmp_path):
    import pyarrow.parquet as pq
    table, _ = index("bp4d", F.make_bp4d(tmp_path / "bp4d", sequences=(("F001", "T1"),)))
    pq.write_table(table, tmp_path / "index.parquet")
    back = pq.read_table(tmp_path / "index.parquet")
    assert back.schema.metadata[b"affectprep.label_set"] == b"bp4d12"
    assert back.column("au").type == pa.list_(pa.float32())
    assert back.to_pylist()[6]["sample_id"] == "F001_T1_7" and math.isnan(back.to_pylist()[6]["au"][1])
