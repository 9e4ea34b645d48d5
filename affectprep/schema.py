"""Arrow schemas: the contract between `pipeline/` (which writes stores) and `models/` (which reads them).

Every store file carries SCHEMA_VERSION and its stage name in the Parquet metadata. A change to a schema that
old readers cannot read bumps SCHEMA_VERSION.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# Per-sample outcome, present in every store.
STATUS_OK = "ok"
STATUS_FAILED = "failed"

NUM_LANDMARKS = 68

_STATUS_FIELDS = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
]


def _schema(stage: str, fields: list[pa.Field]) -> pa.Schema:
    fields = [pa.field("sample_id", pa.string(), nullable=False), *fields, *_STATUS_FIELDS]
    return pa.schema(fields, metadata={b"affectprep.schema_version": str(SCHEMA_VERSION).encode(),
                                       b"affectprep.stage": stage.encode()})


# One row per annotated sample, written by a dataset adapter. Rows the adapter could not accept (unknown label,
# missing media, path outside the root) are kept with status "failed" so nothing is silently dropped.
INDEX = _schema("index", [
    pa.field("media_path", pa.string()),            # absolute path: video file, folder of frames, image or wav
    pa.field("media_kind", pa.string()),            # "video" | "frames" | "image" | "audio"
    pa.field("frame_start", pa.int32()),            # window inside the media, in source frames; 0 = start
    pa.field("frame_end", pa.int32()),              # exclusive; -1 = to the end
    pa.field("label", pa.int32()),                  # index into the dataset's label set; -1 = none (AU data)
    pa.field("label_name", pa.string()),
    pa.field("labels", pa.list_(pa.int32())),       # all labels of a multi-label sample (MAFW compound)
    pa.field("au", pa.list_(pa.float32())),         # AU occurrence 0/1 in the label set's AU order; NaN unknown
    pa.field("split", pa.string()),                 # official fixed split ("train"/"val"/"test"), else null
    pa.field("fold", pa.int32()),                   # the fold whose test set holds this sample; 0 = no folds
    pa.field("subject", pa.string()),
    pa.field("transcript", pa.string()),
])

# Frame sampling decided per clip. The frames themselves are decoded again by `faces`, which needs only these
# indices: storing full-resolution frames would cost far more disk than re-reading the few we need.
FRAMES = _schema("frames", [
    pa.field("frame_indices", pa.list_(pa.int32())),  # num_views * frames_per_view source frame indices
    pa.field("num_views", pa.int32()),
    pa.field("frames_per_view", pa.int32()),
    pa.field("num_source_frames", pa.int32()),
    pa.field("fps", pa.float32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("padded", pa.bool_()),                   # the clip had fewer frames than asked for
    pa.field("decoder", pa.string()),                 # "decord" | "pyav" | "folder" | "image"
])

# Aligned face crops, in the order of frame_indices.
FACES = _schema("faces", [
    pa.field("frame_indices", pa.list_(pa.int32())),
    pa.field("num_views", pa.int32()),
    pa.field("frames_per_view", pa.int32()),
    pa.field("crops", pa.list_(pa.binary())),                                    # JPEG, size x size
    pa.field("landmarks", pa.list_(pa.list_(pa.float32(), NUM_LANDMARKS * 2))),  # x0,y0,x1,y1.. in crop pixels
    pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),                      # x0,y0,x1,y1 in source pixels
    pa.field("detected", pa.list_(pa.bool_())),       # the detector found a face in this frame (else filled in)
    pa.field("size", pa.int32()),
    pa.field("backend", pa.string()),                 # "fan" | "haar" | "center_crop"
    pa.field("landmark_source", pa.string()),         # "fan" (detected) | "template" (mean shape fitted to box+eyes)
])

SCHEMAS: dict[str, pa.Schema] = {"index": INDEX, "frames": FRAMES, "faces": FACES}


def schema_for(stage: str) -> pa.Schema:
    return SCHEMAS[stage]
