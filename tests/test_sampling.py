import pytest
from hypothesis import given, settings, strategies as st

from affectprep.pipeline.sampling import sample_indices


def test_uniform_uses_one_fixed_stride_centred():
    (view,), padded = sample_indices(40)
    assert view == list(range(4, 35, 2)) and not padded   # stride 40 // 16 = 2, block of 31 centred


def test_short_clips_repeat_the_last_frame():
    (view,), padded = sample_indices(8)
    assert view == [0, 1, 2, 3, 4, 5, 6, 7] + [7] * 8 and padded


def test_window_inside_the_clip():
    (view,), _ = sample_indices(100, start=10, end=42)
    assert view == list(range(10, 42, 2))


def test_segment_sampling_takes_segment_centres_and_views_interleave():
    views, padded = sample_indices(32, method="segment", views=2)
    assert views == [list(range(0, 32, 2)), list(range(1, 32, 2))] and not padded
    (centre,), _ = sample_indices(64, method="segment")
    assert centre == list(range(2, 64, 4))


def test_stride_views_spread_over_the_clip():
    views, _ = sample_indices(100, method="stride", stride=4, views=2)
    assert [v[1] - v[0] for v in views] == [4, 4]
    assert views[0][0] < views[1][0] and views[1][-1] <= 99


def test_bad_arguments():
    with pytest.raises(ValueError, match="no frames"):
        sample_indices(0)
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample_indices(10, method="random")


def test_a_window_past_the_ends_repeats_the_edge_frames_and_keeps_its_centre():
    (view,), padded = sample_indices(20, start=-2, end=14)          # 16 frames centred on frame 6
    assert view == [0, 0, 0] + list(range(1, 14)) and view[8] == 6 and padded
    (view,), padded = sample_indices(20, start=11, end=27)          # 16 frames centred on frame 19, the last
    assert view == list(range(11, 20)) + [19] * 7 and view[8] == 19 and padded
    with pytest.raises(ValueError, match="not centred inside the media's 20 frames"):
        sample_indices(20, start=14, end=30)                        # centre 22: the labelled frame is not there


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 500), method=st.sampled_from(["uniform", "stride", "segment"]),
       frames=st.integers(1, 32), stride=st.integers(1, 8), views=st.integers(1, 4),
       start=st.integers(-40, 600), length=st.integers(-1, 600))
def test_properties(n, method, frames, stride, views, start, length):
    end = -1 if length < 0 else start + length
    lo, hi = start, n if end < 0 else end
    if not (lo < hi and 0 <= lo + (hi - lo) // 2 < n):
        with pytest.raises(ValueError, match="not centred inside"):
            sample_indices(n, start=start, end=end)
        return
    out, padded = sample_indices(n, method=method, num_frames=frames, stride=stride, views=views, start=start,
                                 end=end)
    assert len(out) == views and all(len(v) == frames for v in out)
    for view in out:
        assert all(max(lo, 0) <= i < min(hi, n) for i in view), (view, lo, hi)
        assert view == sorted(view)
    if not padded:
        assert all(len(set(v)) == frames for v in out)
