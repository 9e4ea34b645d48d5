"""Which source frames a clip contributes: one or more views of `num_frames` indices each.

- "uniform": one fixed stride over the whole window, stride = window // num_frames, the block centred. Views shift
  the block by evenly spaced offsets inside one stride, so they interleave.
- "stride": a user-chosen stride (MAE-DFER samples 16 frames with stride 4); views are temporal crops spread evenly
  over the clip, the usual multi-view test protocol.
- "segment": DFER-CLIP/TSN segments: the window cut into num_frames equal segments, one frame per segment (view v
  takes the point (v + 0.5) / views of the way through each segment).

A window shorter than a view is padded by repeating its last frame. A window may reach past the media's ends (an AU
sample's window centred on a labelled frame near one): its positions outside the media repeat the first or last
frame, so every view keeps the window's own centre. Its centre frame must lie inside the media.
"""
from __future__ import annotations

METHODS = ("uniform", "stride", "segment")


def sample_indices(num_source: int, *, method: str = "uniform", num_frames: int = 16, stride: int = 4,
                   views: int = 1, start: int = 0, end: int = -1) -> tuple[list[list[int]], bool]:
    """(views x num_frames source indices, padded). All indices lie in [start, end) clipped to the media, and never
    decrease in a view; padded when a frame stands in for one the window lacks (a short window, or one past the media)."""
    if num_source <= 0:
        raise ValueError("the media has no frames")
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    if num_frames < 1 or views < 1 or stride < 1:
        raise ValueError("num_frames, views and stride must be at least 1")
    end = num_source if end is None or end < 0 else end
    centre = start + (end - start) // 2
    if not (start < end and 0 <= centre < num_source):
        raise ValueError(f"the window [{start}, {end}) is not centred inside the media's {num_source} frames")
    n = end - start
    if method == "segment":
        chosen = [[min(n - 1, int((i + (v + 0.5) / views) * n / num_frames)) for i in range(num_frames)]
                  for v in range(views)]
        padded = n < num_frames
    else:
        step = max(1, n // num_frames) if method == "uniform" else stride
        span = (num_frames - 1) * step + 1
        if method == "uniform":
            first = max(0, (n - span) // 2)
            offsets = [first + (v * step) // views for v in range(views)]
        else:
            room = max(0, n - span)
            offsets = [round(room * (v + 0.5) / views) if views > 1 else room // 2 for v in range(views)]
        chosen = [[min(n - 1, o + i * step) for i in range(num_frames)] for o in offsets]
        padded = span > n
    positions = [[start + i for i in view] for view in chosen]
    outside = any(not 0 <= i < num_source for view in positions for i in view)
    return [[min(num_source - 1, max(0, i)) for i in view] for view in positions], padded or outside
