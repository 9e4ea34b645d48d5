import numpy as np
import pytest

from affectprep.pipeline.media import MediaError, frame_images, probe, read_frames

from media_fixtures import broken_files, face_clip, frame_folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return face_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", num_frames=24)


def test_probe_counts_frames_without_decoding(clip):
    info = probe(clip, "video")
    assert (info.num_frames, info.width, info.height) == (24, 160, 120)
    assert info.fps == pytest.approx(25) and info.decoder == "decord"
    assert probe(clip, "video", decoder="pyav").decoder == "pyav"


def test_decord_and_pyav_return_the_same_frames(clip):
    indices = [0, 5, 5, 23, 11]   # any order, repeats allowed
    a = read_frames(clip, "video", indices, decoder="decord")
    b = read_frames(clip, "video", indices, decoder="pyav")
    assert a.shape == b.shape == (5, 120, 160, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0   # same frames, up to colour conversion rounding
    assert np.array_equal(a[1], a[2])
    assert np.abs(a[0].astype(int) - a[3].astype(int)).mean() > 1.0  # and they really are different frames


def test_frame_folders_sort_naturally(tmp_path):
    folder = frame_folder(tmp_path / "frames", num_frames=12)
    assert [p.name for p in frame_images(folder)][:3] == ["1.jpg", "2.jpg", "3.jpg"]
    info = probe(folder, "frames")
    assert (info.num_frames, info.decoder) == (12, "folder")
    frames = read_frames(folder, "frames", [1, 9])
    assert frames.shape == (2, 120, 160, 3)
    with pytest.raises(MediaError, match="frame 12 asked for, but frames holds 12 frames"):
        read_frames(folder, "frames", [12])


def test_single_image(tmp_path):
    folder = frame_folder(tmp_path / "frames", num_frames=1)
    image = folder / "1.jpg"
    assert probe(image, "image").num_frames == 1
    assert read_frames(image, "image", [0]).shape == (1, 120, 160, 3)


@pytest.mark.parametrize("decoder", ["auto", "decord", "pyav"])
def test_every_broken_video_is_a_media_error(tmp_path, decoder):
    files = broken_files(tmp_path)
    expected = {"empty": "is empty \\(0 bytes\\)", "garbage": "unreadable video garbage.mp4",
                "truncated": "truncated.mp4", "missing": "not found"}
    for name, path in files.items():
        with pytest.raises(MediaError, match=expected[name]):
            info = probe(path, "video", decoder=decoder)
            read_frames(path, "video", list(range(info.num_frames)), decoder=decoder)


def test_frames_past_the_end_are_a_media_error(clip):
    for decoder in ("decord", "pyav"):
        with pytest.raises(MediaError, match="frame 30"):
            read_frames(clip, "video", [0, 30], decoder=decoder)


def test_empty_folder_and_unreadable_image(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="holds no images"):
        probe(tmp_path / "empty", "frames")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(MediaError, match="unreadable image bad.jpg"):
        probe(bad, "image")
    with pytest.raises(MediaError, match="no frames"):
        probe(bad, "audio")


def test_a_truncated_mkv_is_flagged_or_failed(tmp_path):
    from affectprep.pipeline.stage import SampleError
    from affectprep.pipeline.stages.frames import FramesConfig, FramesStage

    whole = face_clip(tmp_path / "whole.mkv", num_frames=120)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    assert not probe(whole, "video").truncated
    info = probe(cut, "video")
    assert info.stated_frames == 120 and 0 < info.num_frames < 100 and info.truncated
    row = {"sample_id": "cut", "media_path": str(cut), "media_kind": "video", "frame_start": 0, "frame_end": -1}
    flagged = FramesStage(FramesConfig()).process_one(row)
    assert f"{info.num_frames} of the 120 frames" in flagged["warning"]
    assert max(flagged["frame_indices"]) < info.num_frames          # sampled from what is there
    assert FramesStage(FramesConfig()).process_one({**row, "media_path": str(whole)})["warning"] is None
    with pytest.raises(SampleError, match="truncated"):
        FramesStage(FramesConfig(truncated="fail")).process_one(row)
