import numpy as np

from affectprep.labels import label_set
from affectprep.pipeline.datasets import build_index
from affectprep.pipeline.demo import DFEW_LABELS, EXPRESSIONS, make_demo_dataset, render_frames
from affectprep.pipeline.media import probe


def test_demo_is_a_valid_dfew_tree_with_balanced_labels_and_a_fold_partition(tmp_path):
    root = make_demo_dataset(tmp_path / "DFEW", clips=14, seed=3)
    index = build_index("dfew", root).to_pylist()
    assert len(index) == 14 and all(r["status"] == "ok" for r in index)
    names = label_set("basic7").names
    assert DFEW_LABELS == tuple(names)  # the demo writes DFEW's official codes
    assert sorted(r["label"] for r in index) == sorted(list(range(7)) * 2)
    folds = [r["fold"] for r in index]
    assert sorted(folds.count(f) for f in range(1, 6)) == [2, 3, 3, 3, 3]
    for fold in range(1, 6):
        train = (root / "EmoLabel_DataSplit" / "train(single-labeled)" / f"set_{fold}.csv").read_text().split()[1:]
        test = (root / "EmoLabel_DataSplit" / "test(single-labeled)" / f"set_{fold}.csv").read_text().split()[1:]
        assert not {r.split(",")[0] for r in train} & {r.split(",")[0] for r in test}
        assert len(train) + len(test) == 14
    info = probe(root / "Clip" / "original" / "00001.mp4", "video")
    assert 32 <= info.num_frames <= 48 and (info.width, info.height) == (320, 240)


def _apex_difference(label: str, seed: int) -> float:
    """Mean absolute difference from the neutral clip with the same camera, at the frame where it is largest.
    The random draws do not depend on the label, so the only difference is the expression."""
    a = np.array(render_frames(label, seed=seed), dtype=np.float32)
    b = np.array(render_frames("neutral", seed=seed), dtype=np.float32)
    return float(np.abs(a - b).mean(axis=(1, 2, 3)).max())


def test_facial_motion_depends_on_the_label():
    for label in EXPRESSIONS:
        difference = _apex_difference(label, seed=7)
        if label == "neutral":
            assert difference == 0
        else:
            assert difference > 0.3, label
    happy = np.array(render_frames("happy", seed=7), dtype=np.float32)
    sad = np.array(render_frames("sad", seed=7), dtype=np.float32)
    assert np.abs(happy[0] - sad[0]).mean() < 0.5   # both start from the same face
    assert np.abs(happy - sad).mean(axis=(1, 2, 3)).max() > 0.3   # and move it differently
