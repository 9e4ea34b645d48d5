"""Face engine: Haar and FAN backends, tracking, gap filling, smoothing and alignment on the real astronaut photo."""
from __future__ import annotations

import os
import sys

import av
import cv2
import numpy as np
import pytest
from skimage import data

from affectprep import schema
from affectprep.pipeline.backends import face_fan
from affectprep.pipeline.backends.face import (
    AlignedClip, NoFaceError, align_clip, canonical_landmarks, fan_weights_present, load_face_backend)
from affectprep.pipeline.backends.face_track import fill_gaps, select_track, smooth_over_time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ASTRONAUT = data.astronaut()
# Eye centres in the astronaut photo, read off the image (image-left eye first), and a box around eyes and mouth.
ASTRONAUT_EYES = np.array([[203.0, 102.0], [245.0, 103.0]])
ASTRONAUT_FACE_CORE = np.array([195.0, 92.0, 255.0, 150.0])
FACE_CENTRE = (224.0, 120.0)
CANVAS = (640, 480)
BACKGROUND = 120


def astronaut_frame(dx: float = 0.0, dy: float = 0.0, angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The photo on a grey 640x480 canvas, its face moved by (dx, dy) from the centre and rotated by `angle`
    degrees (counter-clockwise); returns the frame and where the eyes went."""
    transform = cv2.getRotationMatrix2D(FACE_CENTRE, angle, 1.0)
    transform[:, 2] += (CANVAS[0] / 2 - FACE_CENTRE[0] + dx, CANVAS[1] / 2 - FACE_CENTRE[1] + dy)
    frame = cv2.warpAffine(ASTRONAUT, transform, CANVAS, borderMode=cv2.BORDER_CONSTANT, borderValue=(BACKGROUND,) * 3)
    return frame, ASTRONAUT_EYES @ transform[:, :2].T + transform[:, 2]


def blank_frame() -> np.ndarray:
    return np.full((CANVAS[1], CANVAS[0], 3), BACKGROUND, np.uint8)


def through_video(frames: np.ndarray, path) -> np.ndarray:
    """Frames after an H.264 round trip, compression artefacts included, as a decoded video would give them."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def moving_clip(count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` frames of the face drifting right and down while turning from -8 to +10 degrees."""
    made = [astronaut_frame(-60 + 120 * i / (count - 1), -20 + 40 * i / (count - 1), -8 + 18 * i / (count - 1))
            for i in range(count)]
    return np.stack([frame for frame, _ in made]), np.stack([eyes for _, eyes in made])


def decode(crop: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "crop is not a decodable image"
    return image


@pytest.fixture(scope="module")
def haar():
    return load_face_backend("haar")


def test_haar_finds_the_face_and_places_the_eyes(haar):
    frame, eyes = astronaut_frame(dx=40, dy=-30)
    (detection,) = haar.detect(frame[None])
    assert detection is not None
    assert detection.box.dtype == np.float32 and detection.landmarks.shape == (schema.NUM_LANDMARKS, 2)
    x0, y0, x1, y1 = detection.box
    shift = np.array([CANVAS[0] / 2 - FACE_CENTRE[0] + 40, CANVAS[1] / 2 - FACE_CENTRE[1] - 30])
    core = ASTRONAUT_FACE_CORE + np.tile(shift, 2)
    assert x0 <= core[0] and y0 <= core[1] and x1 >= core[2] and y1 >= core[3], (detection.box, core)
    assert (x1 - x0) < 2.5 * (core[2] - core[0]), "box much larger than the face"
    found_eyes = np.stack([detection.landmarks[36:42].mean(0), detection.landmarks[42:48].mean(0)])
    assert np.abs(found_eyes - eyes).max() < 5, (found_eyes, eyes)
    assert haar.landmark_source == "template" and detection.score > 0
    assert haar.identity["backend"] == "haar" and haar.identity["detect_max_side"] == 320


def test_align_clip_puts_the_real_eyes_at_the_same_crop_positions(haar, tmp_path):
    frames, eyes = moving_clip(8)
    clip = align_clip(through_video(frames, tmp_path / "moving.mp4"), haar)

    assert isinstance(clip, AlignedClip) and clip.backend == "haar" and clip.landmark_source == "template"
    assert clip.detected.all()
    assert [decode(crop).shape for crop in clip.crops] == [(224, 224, 3)] * 8
    assert clip.landmarks.shape == (8, 68, 2) and clip.boxes.shape == (8, 4)
    # The true eyes, carried through each frame's alignment, stay put although the face moved 120 px and turned 18°.
    eyes_in_crop = np.einsum("nij,nkj->nki", clip.transforms[:, :, :2], eyes) + clip.transforms[:, None, :, 2]
    assert eyes_in_crop.std(axis=0).max() < 1.5, eyes_in_crop
    canonical = canonical_landmarks(224, 0.25)
    canonical_eyes = np.stack([canonical[36:42].mean(0), canonical[42:48].mean(0)])
    assert np.abs(eyes_in_crop - canonical_eyes).max() < 6
    # The landmarks in the crop agree: eyes level and in the same place in every frame.
    crop_eyes = np.stack([clip.landmarks[:, 36:42].mean(1), clip.landmarks[:, 42:48].mean(1)], axis=1)
    assert crop_eyes.std(axis=0).max() < 1.0
    assert np.abs(crop_eyes[:, 0, 1] - crop_eyes[:, 1, 1]).max() < 1.0


def test_frames_without_a_face_are_filled_from_their_neighbours(haar):
    frames, _ = moving_clip(8)
    frames[3:5] = blank_frame()
    clip = align_clip(frames, haar)

    assert clip.detected.tolist() == [True, True, True, False, False, True, True, True]
    centres = (clip.boxes[:, :2] + clip.boxes[:, 2:]) / 2
    low, high = np.minimum(centres[2], centres[5]), np.maximum(centres[2], centres[5])
    assert ((centres[3:5] >= low - 2) & (centres[3:5] <= high + 2)).all(), centres
    assert len(clip.crops) == 8 and all(decode(crop).shape == (224, 224, 3) for crop in clip.crops)


def test_no_face_anywhere_fails_or_falls_back_to_a_centre_crop(haar):
    frames = np.stack([blank_frame()] * 4)
    with pytest.raises(NoFaceError, match="no face detected in any of the 4 sampled frames"):
        align_clip(frames, haar)

    clip = align_clip(frames, haar, no_face="center_crop", size=112)
    assert clip.backend == "center_crop" and clip.landmark_source == "template"
    assert not clip.detected.any()
    assert [decode(crop).shape for crop in clip.crops] == [(112, 112, 3)] * 4
    assert np.allclose(clip.landmarks, canonical_landmarks(112, 0.25))
    assert clip.boxes[0].tolist() == [80.0, 0.0, 560.0, 480.0]


def test_bad_input_is_a_clear_error(haar):
    with pytest.raises(ValueError, match="uint8"):
        align_clip(np.zeros((2, 64, 64, 3), np.float32), haar)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        align_clip(np.zeros((64, 64, 3), np.uint8), haar)
    with pytest.raises(ValueError, match="no_face"):
        align_clip(np.zeros((1, 64, 64, 3), np.uint8), haar, no_face="skip")
    with pytest.raises(ValueError, match="unknown face backend"):
        load_face_backend("openface")
    with pytest.raises(ValueError, match="takes no options"):
        load_face_backend("haar", detector="sfd")


def test_track_keeps_the_main_face_through_other_faces_and_false_detections():
    def main(x: float) -> np.ndarray:
        return np.array([x, 200, x + 100, 300], np.float32)

    corner = np.array([10, 10, 50, 50], np.float32)
    huge_false = np.array([0, 0, 470, 470], np.float32)  # one frame only, as Haar's spurious boxes are
    far_jump = main(400)  # too far from where the face was to be the same one
    candidates = [np.stack([corner, main(200)]), np.stack([main(215), corner]), np.stack([huge_false, corner]),
                  np.stack([corner, main(245)]), np.zeros((0, 4), np.float32), np.stack([far_jump, main(270)])]
    scores = [np.full(len(boxes), 20.0, np.float32) for boxes in candidates]
    assert select_track(candidates, scores, CANVAS) == [1, 0, None, 1, None, 1]


def test_fill_gaps_interpolates_and_smoothing_keeps_steady_motion():
    values = np.arange(10, dtype=np.float32)[:, None] * np.array([[2.0, -1.0]], np.float32)
    present = np.ones(10, bool)
    present[[0, 4, 5, 9]] = False
    holed = np.where(present[:, None], values, np.nan)
    filled = fill_gaps(holed, present)
    assert np.allclose(filled[1:9], values[1:9])
    assert np.allclose(filled[0], values[1]) and np.allclose(filled[9], values[8])  # held past the ends

    assert np.allclose(smooth_over_time(values, 5), values, atol=1e-5)  # linear motion: no lag, ends included
    jitter = values + np.tile([[0.5], [-0.5]], (5, 2)).astype(np.float32)
    assert np.abs(smooth_over_time(jitter, 5) - values)[2:-2].max() < 0.11


# --- FAN (face-alignment), with randomly initialised weights saved where face-alignment looks for them ---

@pytest.fixture(scope="module")
def face_alignment():
    numba = pytest.importorskip("numba")
    if "face_alignment" not in sys.modules:
        # face-alignment JIT-compiles two small helpers on first use (~13 s on a 2-core box); in tests they run as
        # the same code in plain Python. The setting counts when the package is imported, so restore it after.
        jit_was_disabled = numba.config.DISABLE_JIT
        numba.config.DISABLE_JIT = True
        pytest.importorskip("face_alignment")
        numba.config.DISABLE_JIT = jit_was_disabled
    return pytest.importorskip("face_alignment")


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory, face_alignment):
    """A torch hub cache holding random FAN and S3FD weights under face-alignment's own file names."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = face_fan.hub_checkpoints(home)
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), checkpoints / face_fan.FAN_WEIGHTS_FILE)
    # A random S3FD calls every anchor a face and takes minutes; this one sees a face only at its coarsest scale
    # (a handful of anchors), so the real detection path runs in a moment.
    detector = s3fd()
    with torch.no_grad():
        for name, layer in detector.named_modules():
            if name.endswith(("_mbox_conf", "_mbox_loc")):
                layer.weight.zero_()
                layer.bias.zero_()
        for name in ("conv4_3_norm", "conv5_3_norm", "fc7", "conv6_2"):
            getattr(detector, f"{name}_mbox_conf").bias[0] = 20.0     # background
        detector.conv3_3_norm_mbox_conf.bias[:3] = 20.0               # its three background channels
        detector.conv7_2_mbox_conf.bias[1] = 20.0                     # face
    torch.save(detector.state_dict(), checkpoints / face_fan.S3FD_WEIGHTS_FILE)
    return home


def test_weight_file_names_are_the_ones_face_alignment_downloads(face_alignment):
    from face_alignment.detection.sfd import sfd_detector

    assert face_alignment.api.models_urls["2DFAN-4"].endswith("/" + face_fan.FAN_WEIGHTS_FILE)
    assert sfd_detector.models_urls["s3fd"].endswith("/" + face_fan.S3FD_WEIGHTS_FILE)


def test_fan_weights_present(torch_home, tmp_path):
    assert fan_weights_present(torch_home)
    assert not fan_weights_present(tmp_path)


def test_fan_on_haar_boxes(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    backend = load_face_backend("fan", detector="haar", flip_input=False)
    assert backend.name == "fan" and backend.landmark_source == "fan"
    frames, _ = moving_clip(3)
    detections = backend.detect(frames)
    haar_boxes = [found.box for found in load_face_backend("haar").detect(frames)]
    for detection, haar_box in zip(detections, haar_boxes):
        assert detection.landmarks.shape == (68, 2) and detection.landmarks.dtype == np.float32
        assert np.isfinite(detection.landmarks).all()
        assert np.array_equal(detection.box, haar_box)

    # Random weights give meaningless landmarks: alignment must still produce crops (it falls back to the box).
    clip = align_clip(frames[:2], backend, size=96)
    assert clip.landmark_source == "fan" and clip.landmarks.shape == (2, 68, 2)
    assert [decode(crop).shape for crop in clip.crops] == [(96, 96, 3)] * 2


def test_auto_uses_fan_with_s3fd_when_both_are_cached(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    backend = load_face_backend("auto", flip_input=False, detect_max_side=160)
    assert backend.name == "fan" and backend.detector == "sfd"
    assert backend.identity["detector"] == face_fan.S3FD_WEIGHTS_FILE and not backend.identity["flip_input"]
    frames, _ = moving_clip(2)
    detections = backend.detect(frames)
    assert all(found is not None and found.landmarks.shape == (68, 2) for found in detections)
    assert all(found.score > 0.5 for found in detections)


def test_auto_without_fan_weights_is_the_offline_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "dlib", None)  # dlib absent (tests/test_face_dlib.py: with it, auto is dlib)
    assert load_face_backend("auto", flip_input=False).name == "haar"


def test_fan_without_face_alignment_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "face_alignment", None)  # what Python does when a package is absent
    with pytest.raises(ImportError, match=r"affectprep\[face\]"):
        load_face_backend("fan")


def test_fan_batches_a_clip_and_matches_face_alignments_own_per_image_path(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    backend = load_face_backend("fan", detector="haar", flip_input=True)
    assert backend.frames_per_batch == 1   # on a CPU; a GPU takes 16 frames a pass
    backend.frames_per_batch = 2
    frames, _ = moving_clip(2)
    boxes = [np.array([150.0, 80.0, 300.0, 250.0]) + 10 * i for i in range(2)]
    calls = []
    network = backend._aligner.face_alignment_net
    monkeypatch.setattr(backend._aligner, "face_alignment_net", lambda x: calls.append(len(x)) or network(x))
    batched = backend.landmarks(frames, boxes)
    assert calls == [2, 2], "the frames (and their mirror images) should be one network call each"
    monkeypatch.setattr(backend._aligner, "face_alignment_net", network)
    for frame, box, points in zip(frames, boxes, batched):
        (own,) = backend._aligner.get_landmarks_from_image(frame, detected_faces=[box])
        assert points.shape == (68, 2) and np.allclose(points, own, atol=1e-3), np.abs(points - own).max()
