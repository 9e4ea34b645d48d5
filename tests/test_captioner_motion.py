import numpy as np
import pytest

from affectprep.pipeline.backends.captioner_motion import MotionCaptioner
from affectprep.pipeline.backends.face import align_clip, load_face_backend
from affectprep.pipeline.demo import render_frames
from affectprep.pipeline.sampling import sample_indices


@pytest.fixture(scope="module")
def captions():
    """Captions of demo clips with the same camera and timing, aligned by the real face engine."""
    backend, captioner = load_face_backend("haar"), MotionCaptioner()
    (indices,), _ = sample_indices(40)
    out = {}
    for label in ("neutral", "happy", "sad", "surprise", "disgust", "fear"):
        clip = align_clip(np.array(render_frames(label, seed=3, num_frames=40))[indices], backend)
        out[label] = captioner.caption(clip.crops, clip.landmarks, 16)
        assert captioner.caption(clip.crops, clip.landmarks, 16) == out[label]   # deterministic
    return out


def test_each_expression_gets_its_own_facs_description(captions):
    assert len(set(captions.values())) == len(captions)
    assert "AU15" in captions["sad"] and "AU1" in captions["sad"]
    assert "AU9" in captions["disgust"] and "AU10" in captions["disgust"]
    assert "AU20" in captions["fear"] and ("AU1" in captions["fear"] or "AU2" in captions["fear"])
    assert "AU6" in captions["happy"]
    assert "AU5" in captions["surprise"] or "AU1" in captions["surprise"]
    for text in captions.values():
        assert text.startswith("Over 16 frames") and "frame" in text
        assert not any(word in text.lower() for word in ("happy", "sad", "angry", "fear", "disgust", "surpris"))


def test_neutral_names_no_mouth_movement(captions):
    assert not any(au in captions["neutral"] for au in ("AU12", "AU15", "AU20", "AU26", "AU9", "AU10"))


def test_still_images_and_still_faces():
    captioner = MotionCaptioner()
    frame = np.array(render_frames("neutral", seed=0, num_frames=1))
    clip = align_clip(frame, load_face_backend("haar"))
    assert captioner.caption(clip.crops, clip.landmarks, 1) == "A single frame: no facial movement can be seen."
    still = captioner.caption(clip.crops * 8, np.repeat(clip.landmarks, 8, axis=0), 8)
    assert still == "No clear facial movement: the face stays still across the 8 frames."
