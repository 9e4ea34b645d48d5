"""models/data.py on real tiny stores: JPEG crops of rendered demo frames, written part by part with Store.write."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from affectprep import schema as S
from affectprep import store as store_module
from affectprep.models.data import (ClipAugment, Split, StoreClips, collate, decode_frames,
                                    class_weights_from_labels, select_samples, shard)
from affectprep.pipeline.demo import render_frames
from affectprep.store import Store

FRAMES_PER_VIEW, NUM_VIEWS, SIZE = 4, 2, 64
PARTS, PER_PART = 4, 5


def _jpeg(frame: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A faces store of 4 parts x 5 ok samples (2 views x 4 frames), plus one failed sample, and its index.

    The index also names one sample the faces stage never wrote and one without a label.
    """
    cache = tmp_path_factory.mktemp("cache")
    crops = {}
    for label, name in enumerate(("happy", "surprise")):
        frames = render_frames(name, seed=label, num_frames=NUM_VIEWS * FRAMES_PER_VIEW)
        # The centre square of each frame, where the face is, shrunk to keep the store small.
        crops[label] = [_jpeg(cv2.resize(f[:, 40:280], (SIZE, SIZE), interpolation=cv2.INTER_AREA)) for f in frames]
    faces = Store(cache, "tiny", "faces", "k")
    index_rows = []
    for part in range(PARTS):
        rows = []
        for j in range(PER_PART):
            sid, label = f"s{part * PER_PART + j:02d}", (part + j) % 2
            rows.append({"sample_id": sid, "num_views": NUM_VIEWS, "frames_per_view": FRAMES_PER_VIEW,
                         "crops": crops[label], "size": SIZE, "status": S.STATUS_OK})
            index_rows.append({"sample_id": sid, "label": label, "fold": 1 + part % 2,
                               "split": "test" if part == 3 else "train", "status": S.STATUS_OK})
        faces.write(rows)
    faces.write([{"sample_id": "failed", "status": S.STATUS_FAILED, "error": "no face found"}])
    index_rows += [{"sample_id": "failed", "label": 0, "fold": 1, "split": "train", "status": S.STATUS_OK},
                   {"sample_id": "absent", "label": 1, "fold": 1, "split": "train", "status": S.STATUS_OK},
                   {"sample_id": "unlabelled", "label": -1, "fold": 1, "split": "train", "status": S.STATUS_OK},
                   {"sample_id": "bad-media", "label": 0, "fold": 1, "split": "train", "status": S.STATUS_FAILED}]
    index = Store(cache, "tiny", "index", "k")
    index.write(index_rows)
    return faces, index


def _ok_ids() -> list[str]:
    return [f"s{i:02d}" for i in range(PARTS * PER_PART)]


def _samples(index: Store) -> list[dict]:
    return [r for r in index.read().to_pylist() if r["sample_id"] in set(_ok_ids())]


def _eval_augment() -> ClipAugment:
    return ClipAugment(size=32, train=False)


def test_select_samples_by_fold_and_by_split(stores):
    _, index = stores
    ids = lambda rows: [r["sample_id"] for r in rows]  # noqa: E731
    fold1 = [sid for sid in _ok_ids() if int(sid[1:]) // PER_PART % 2 == 0]
    assert ids(select_samples(index, Split(fold=1), "test")) == sorted(fold1 + ["absent", "failed"])
    assert ids(select_samples(index, Split(fold=1), "train")) == sorted(set(_ok_ids()) - set(fold1))
    assert ids(select_samples(index, Split(), "test")) == _ok_ids()[15:]
    assert ids(select_samples(index, Split(), "train")) == sorted(_ok_ids()[:15] + ["absent", "failed"])
    assert select_samples(index, Split(), "val") == []
    with pytest.raises(ValueError, match="no fold 3; it has folds 1, 2"):
        select_samples(index, Split(fold=3), "train")
    with pytest.raises(ValueError, match="unknown part"):
        select_samples(index, Split(), "dev")


def test_inverse_sqrt_class_weights_from_labels():
    weights = class_weights_from_labels([0, 0, 0, 0, 1], num_classes=3)
    assert weights[1] / weights[0] == pytest.approx(2.0)   # 4x rarer -> twice the weight
    assert weights[2] == 0                                 # absent class: never a target
    assert weights[:2].mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        class_weights_from_labels([0, 3], num_classes=3)


def _clip(stores) -> np.ndarray:
    faces, _ = stores
    return decode_frames(faces.read(["crops"], ids=["s00"]).column("crops")[0].as_py()[:FRAMES_PER_VIEW])


def test_augment_shapes_and_flip_and_erase_apply_to_the_whole_clip(stores):
    clip = _clip(stores)
    assert clip.shape == (FRAMES_PER_VIEW, SIZE, SIZE, 3) and clip.dtype == np.uint8
    plain = _eval_augment()(clip)
    assert plain.shape == (FRAMES_PER_VIEW, 3, 32, 32) and plain.dtype == torch.float32

    flipped = ClipAugment(size=32, scale=(1.0, 1.0), flip=1.0, erase=0.0, seed=0)(clip)
    assert torch.equal(flipped, plain.flip(-1))            # every frame flipped, none left as it was

    erased = ClipAugment(size=32, scale=(1.0, 1.0), flip=0.0, erase=1.0, seed=0)(clip)
    changed = (erased != plain).any(dim=1)                 # (T, H, W): where the rectangle lies
    assert changed[0].any() and all(torch.equal(changed[0], c) for c in changed)

    jittered = ClipAugment(size=32, scale=(0.5, 0.6), flip=0.0, erase=0.0, seed=1)(clip)
    assert jittered.shape == plain.shape and not torch.equal(jittered, plain)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) and dtype uint8"):
        _eval_augment()(clip.astype(np.float32))


def test_eval_augment_is_deterministic_and_normalised(stores):
    clip = _clip(stores)
    augment = _eval_augment()
    first, second = augment(clip), augment(clip)
    assert torch.equal(first, second)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    resized = np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in clip])
    expected = (torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(first, expected, atol=1e-5)


def test_every_sample_once_per_epoch_across_workers_and_ranks(stores):
    faces, index = stores
    seen, lengths = [], []
    for rank in range(2):
        data = StoreClips(faces, _samples(index), augment=_eval_augment(), shuffle_buffer=4, rank=rank,
                          world_size=2)
        data.set_epoch(1)
        loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate)
        ids = [sid for batch in loader for sid in batch["sample_ids"]]
        lengths.append(len(ids))
        assert len(ids) == len(data)
        seen += ids
    assert sorted(seen) == _ok_ids()
    assert sorted(lengths) == [10, 10]


def test_multi_view_yields_each_sample_and_view_once(stores):
    faces, index = stores
    data = StoreClips(faces, _samples(index), augment=_eval_augment(), view=None, shuffle_buffer=0)
    batches = list(DataLoader(data, batch_size=8, collate_fn=collate))
    pairs = [(sid, int(v)) for b in batches for sid, v in zip(b["sample_ids"], b["views"])]
    assert sorted(pairs) == [(sid, v) for sid in _ok_ids() for v in range(NUM_VIEWS)]
    first = batches[0]
    assert first["frames"].shape == (8, FRAMES_PER_VIEW, 3, 32, 32)
    assert first["labels"].dtype == torch.long and "texts" not in first


def _epoch(data: StoreClips, epoch: int) -> tuple[list[str], torch.Tensor]:
    data.set_epoch(epoch)
    items = list(data)
    return [i["sample_id"] for i in items], torch.stack([i["frames"] for i in items])


def test_shuffling_differs_between_epochs_and_repeats_for_a_seed(stores):
    faces, index = stores
    make = lambda seed: StoreClips(faces, _samples(index), augment=ClipAugment(size=32), shuffle_buffer=6,  # noqa: E731
                                   seed=seed)
    order0, frames0 = _epoch(make(3407), 0)
    order1, _ = _epoch(make(3407), 1)
    again, frames_again = _epoch(make(3407), 0)
    assert sorted(order0) == sorted(order1) == _ok_ids()
    assert order0 != order1 and order0 != _ok_ids()
    assert order0 == again and torch.equal(frames0, frames_again)   # augmentation reproducible too
    assert _epoch(make(1), 0)[0] != order0


def test_unusable_samples_are_counted_not_fatal(stores):
    faces, index = stores
    samples = select_samples(index, Split(fold=1), "test")
    texts = {r["sample_id"]: f"text of {r['sample_id']}" for r in samples if r["sample_id"] != "s01"}
    data = StoreClips(faces, samples, augment=_eval_augment(), texts=texts, shuffle_buffer=0)
    assert data.missing == 3
    assert data.missing_reasons == {"absent": "is not in the faces store",
                                    "failed": "failed in the faces stage: no face found", "s01": "has no text"}
    batch = collate(list(data))
    assert batch["texts"] == [texts[sid] for sid in batch["sample_ids"]]
    assert len(batch["sample_ids"]) == len(samples) - 3
    assert StoreClips(faces, _samples(index), augment=_eval_augment(), view=2).missing == PARTS * PER_PART


def test_reads_one_part_at_a_time(stores, monkeypatch):
    faces, index = stores
    data = StoreClips(faces, _samples(index), augment=_eval_augment(), shuffle_buffer=0)
    opened = []   # the parts whose rows are read (the store keeps parts open, so count reads, not opens)
    real_file = store_module.Store._file
    monkeypatch.setattr(store_module.Store, "_file", lambda self, part: opened.append(part) or real_file(self, part))
    items = iter(data)
    next(items)
    assert len(opened) == 1                                 # the first clip needs only its own part
    assert len(list(items)) == PARTS * PER_PART - 1
    assert len(opened) == len(set(opened)) == PARTS         # each part opened once, never the whole store


def test_undecodable_crops_are_skipped(tmp_path, stores):
    faces, index = stores
    broken = Store(tmp_path, "tiny", "faces", "k")
    good = faces.read(ids=["s00"]).to_pylist()
    broken.write(good + [{**good[0], "sample_id": "s01", "crops": [b"not a jpeg"] * 8}])
    data = StoreClips(broken, _samples(index), augment=_eval_augment(), shuffle_buffer=0)
    assert [i["sample_id"] for i in data] == ["s00"]


def test_shard_is_balanced_and_exact():
    items = list(range(11))
    shards = [shard(items, r, 4) for r in range(4)]
    assert sorted(x for s in shards for x in s) == items
    assert {len(s) for s in shards} <= {2, 3}
    with pytest.raises(ValueError, match="rank must lie"):
        shard(items, 4, 4)


def test_a_stratified_fraction_keeps_each_class_share_and_depends_only_on_the_seed():
    from collections import Counter

    from affectprep.models.data import stratified_fraction

    samples = [{"sample_id": f"s{i:03d}", "label": label} for i, label in enumerate([0] * 50 + [1] * 30 + [2] * 20)]
    picked = stratified_fraction(samples, 0.2, seed=7)
    assert Counter(s["label"] for s in picked) == {0: 10, 1: 6, 2: 4}
    assert picked == sorted(picked, key=lambda s: s["sample_id"])
    assert picked == stratified_fraction(samples, 0.2, seed=7)
    assert picked != stratified_fraction(samples, 0.2, seed=8)
    assert stratified_fraction(samples, 1.0, seed=7) == samples
    # Remainders: 0.25 of 3 + 3 + 2 = 2 samples, from the strata with the largest remainders (0.75, 0.75; not 0.5).
    few = [{"sample_id": f"t{i}", "label": label} for i, label in enumerate([0, 0, 0, 1, 1, 1, 2, 2])]
    assert sorted(s["label"] for s in stratified_fraction(few, 0.25, seed=1)) == [0, 1]
    # AU samples: stratified by their occurrence pattern (NaN unknown is a value of its own).
    aus = [{"sample_id": f"a{i:02d}", "label": -1, "au": [float(i % 2), float("nan") if i % 3 else 1.0]}
           for i in range(60)]
    patterns = Counter(tuple(str(v) for v in s["au"]) for s in stratified_fraction(aus, 0.5, seed=3))
    assert sorted(patterns.values()) == [5, 5, 10, 10]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        stratified_fraction(samples, 0.0, seed=7)


def test_rotation_turns_every_frame_and_moves_the_landmarks_with_it():
    # A dark clip with one bright dot, its landmark on the dot; rotated by exactly 90 degrees (the range's ends).
    frames = np.zeros((3, 40, 40, 3), np.uint8)
    frames[:, 8, 30] = 255                                   # row 8, column 30
    points = np.array([[[30.5 / 40, 8.5 / 40]]] * 3, np.float32)
    augment = ClipAugment(size=40, scale=(1.0, 1.0), flip=0.0, erase=0.0, rotation=90.0, mean=(0, 0, 0),
                          std=(1, 1, 1), seed=0)
    for seed in range(5):
        clip, moved = augment.with_landmarks(frames, points, np.random.default_rng(seed))
        brightest = [np.unravel_index(int(c[0].argmax()), c[0].shape) for c in clip.numpy()]
        assert len(set(brightest)) == 1                      # one angle for the whole clip
        row, column = brightest[0]
        assert moved[0, 0].numpy() * 40 == pytest.approx([column + 0.5, row + 0.5], abs=1.0)
    # A 90-degree turn, counter-clockwise as OpenCV's angle is: (x, y) -> (y, W - 1 - x) about the centre.
    unrotated = ClipAugment(size=40, scale=(1.0, 1.0), flip=0.0, erase=0.0, rotation=0.0, mean=(0, 0, 0),
                              std=(1, 1, 1))
    from affectprep.models.data import _rotate
    turned, turned_points = _rotate(frames, points, 90.0)
    assert turned[0, 40 - 1 - 30, 8].max() == 255 and turned_points[0, 0] * 40 == pytest.approx([8.5, 9.5], abs=1e-4)
    assert torch.equal(unrotated(frames), ClipAugment(size=40, scale=(1.0, 1.0), flip=0.0, erase=0.0,
                                                        mean=(0, 0, 0), std=(1, 1, 1))(frames))


def test_colour_jitter_changes_colours_alike_in_every_frame_and_hue_alone_keeps_brightness(stores):
    clip = _clip(stores)
    plain = ClipAugment(size=32, scale=(1.0, 1.0), flip=0.0, erase=0.0, seed=0)(clip)
    # Off by default: the same draws and pixels as before jitter existed.
    assert torch.equal(plain, ClipAugment(size=32, scale=(1.0, 1.0), flip=0.0, erase=0.0, seed=0,
                                          color_jitter=(0, 0, 0, 0))(clip))
    same = np.repeat(clip[:1], len(clip), axis=0)
    unit = dict(size=32, scale=(1.0, 1.0), flip=0.0, erase=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    for strengths in ((0.4, 0, 0, 0), (0, 0.4, 0, 0), (0, 0, 0.4, 0), (0, 0, 0, 0.1), (0.4, 0.4, 0.4, 0.1)):
        before = ClipAugment(**unit)(same)
        after = ClipAugment(**unit, color_jitter=strengths, seed=3)(same)
        assert not torch.allclose(after, before, atol=1e-3), strengths
        assert all(torch.equal(after[0], frame) for frame in after), strengths   # one draw per clip
    # Brightness scales every value by one factor (where nothing saturates).
    before = ClipAugment(**unit)(same)
    bright = ClipAugment(**unit, color_jitter=(0.4, 0, 0, 0), seed=3)(same)
    ratio = (bright / before.clamp_min(1e-3))[(before > 0.05) & (bright < 0.99)]
    assert ratio.std() < 1e-3 and 0.6 <= ratio.mean() <= 1.4
    # A hue turn keeps each pixel's max and min channel (HSV's value and saturation).
    hue = ClipAugment(**unit, color_jitter=(0, 0, 0, 0.2), seed=5)(same)
    assert torch.allclose(hue.amax(1), before.amax(1), atol=2e-3) and torch.allclose(hue.amin(1), before.amin(1),
                                                                                     atol=2e-3)
    with pytest.raises(ValueError, match="hue <= 0.5"):
        ClipAugment(color_jitter=(0, 0, 0, 0.7))


def test_refinement_draws_n_pg_per_group_then_b_per_class_each_epoch():
    from collections import Counter

    from affectprep.models.data import Refinement

    # 3 videos of class 0 with 10 frames each, 1 video of class 1 with 4 frames, 2 unlabelled samples.
    samples = ([(f"v{v}-{i}", 0, f"v{v}") for v in range(3) for i in range(10)]
               + [(f"w-{i}", 1, "w") for i in range(4)] + [("u1", -1, "u1"), ("u2", -1, "u2")])
    rng = lambda epoch: np.random.default_rng([0, epoch])  # noqa: E731
    pooled = Refinement(per_group=2).draw(samples, rng(0))
    assert Counter(s.split("-")[0] for s in pooled) == {"v0": 2, "v1": 2, "v2": 2, "w": 2, "u1": 1, "u2": 1}
    drawn = Refinement(per_class=5, per_group=2).draw(samples, rng(0))
    label = {sid: label for sid, label, _ in samples}
    assert Counter(label[s] for s in drawn) == {0: 5, 1: 5, -1: 2}
    # Class 0's 5 come from its pool of 6, without repeats; class 1's pool of 2 repeats up to 5.
    assert len({s for s in drawn if label[s] == 0}) == 5 and len({s for s in drawn if label[s] == 1}) == 2
    assert drawn == Refinement(per_class=5, per_group=2).draw(samples, rng(0))
    assert drawn != Refinement(per_class=5, per_group=2).draw(samples, rng(1))
    with pytest.raises(ValueError, match="per_class must be at least 1"):
        Refinement(per_class=0)


def test_a_refined_store_epoch_yields_b_clips_per_class_and_len_agrees(stores):
    from collections import Counter

    from affectprep.models.data import Refinement

    faces, index = stores
    samples = _samples(index)           # 20 samples, 10 per class, each its own clip
    data = StoreClips(faces, samples, augment=ClipAugment(size=32), shuffle_buffer=4, seed=1,
                      refine=Refinement(per_class=7))
    labels = {s["sample_id"]: s["label"] for s in samples}
    for epoch in (0, 1):
        data.set_epoch(epoch)
        items = list(data)
        assert len(items) == len(data) == 14
        assert Counter(labels[item["sample_id"]] for item in items) == {0: 7, 1: 7}
    first = sorted(item["sample_id"] for item in (data.set_epoch(0), list(data))[1])
    second = sorted(item["sample_id"] for item in (data.set_epoch(1), list(data))[1])
    assert first != second
    # Over-sampling: 12 per class from 10 repeats two of each class within the epoch.
    data = StoreClips(faces, samples, augment=ClipAugment(size=32), shuffle_buffer=0, refine=Refinement(per_class=12))
    counts = Counter(item["sample_id"] for item in data)
    assert sum(counts.values()) == 24 and max(counts.values()) == 2 and len(counts) == 20
