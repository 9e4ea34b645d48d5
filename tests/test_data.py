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
