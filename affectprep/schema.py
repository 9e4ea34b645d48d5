"""Arrow schemas: the contract between `pipeline/` (which writes stores) and `models/` (which reads them).

Every store file carries SCHEMA_VERSION and its stage name in the Parquet metadata. A change to a schema that
old readers cannot read bumps SCHEMA_VERSION.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2

# Per-sample outcome, present in every store.
STATUS_OK = "ok"
STATUS_FAILED = "failed"

NUM_LANDMARKS = 68

_STATUS_FIELDS = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    # What the row was made from: a digest of the sample's own inputs (the index fields the stage reads, the
    # input digests of its upstream rows, and for a stage that learns from other samples, what it learnt from).
    # Store keys hold only what applies to every sample (stage, config, backend, upstream keys); a stored row
    # whose digest is not the one the current annotations give is stale, and its sample is redone.
    pa.field("input_digest", pa.string()),
    # An ok row the stage has doubts about (a video shorter than its container says): kept, counted and listed
    # by `status`, never silent.
    pa.field("warning", pa.string()),
]


def _schema(stage: str, fields: list[pa.Field]) -> pa.Schema:
    fields = [pa.field("sample_id", pa.string(), nullable=False), *fields, *_STATUS_FIELDS]
    return pa.schema(fields, metadata={b"affectprep.schema_version": str(SCHEMA_VERSION).encode(),
                                       b"affectprep.stage": stage.encode()})


# One row per annotated sample, written by a dataset adapter. Rows the adapter could not accept (unknown label,
# missing media, path outside the root) are kept with status "failed" so nothing is silently dropped.
INDEX = _schema("index", [
    pa.field("media_path", pa.string()),            # video file, folder of frames, image or wav: relative to the
                                                    # dataset root (POSIX), absolute only for media outside it
    pa.field("media_kind", pa.string()),            # "video" | "frames" | "image" | "audio"
    pa.field("frame_start", pa.int32()),            # window in source frames; 0 = start; < 0 reaches before it
    pa.field("frame_end", pa.int32()),              # exclusive; -1 = to the end; past the end: edge frames repeat
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
    pa.field("padded", pa.bool_()),                   # a repeated frame fills in (short clip, window past an end)
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
    pa.field("backend", pa.string()),                 # "fan" | "dlib" | "haar" | "center_crop"
    # "fan" | "dlib" (detected by that model) | "template" (the mean shape fitted to the box and eyes: haar, and
    # center_crop's canonical positions)
    pa.field("landmark_source", pa.string()),
])

_TEXT_USAGE = [
    pa.field("backend", pa.string()),                 # "motion" | "template" | "openai" | "hf" | "vllm" | "t5"
    pa.field("model", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("cost_usd", pa.float64()),
]

# GRACE's initial caption D_init: the facial movements of the clip, in FACS terms, without emotion words.
CAPTIONS = _schema("captions", [pa.field("caption", pa.string()), *_TEXT_USAGE])

# Top-k emotion predictions. Every row names the model that made it; the store's models.json lists the samples
# each model trained on. in_fold = the model saw this sample's label, so text built from it would leak the label.
EMOTIONS = _schema("emotions", [
    pa.field("top_labels", pa.list_(pa.int32())),
    pa.field("top_names", pa.list_(pa.string())),
    pa.field("top_probs", pa.list_(pa.float32())),
    pa.field("model_id", pa.string()),
    pa.field("in_fold", pa.bool_()),
])

# CATE's refined description D_final = rewrite(D_init + the top-k emotion descriptor phrases).
CATE = _schema("cate", [
    pa.field("text", pa.string()),
    pa.field("caption", pa.string()),                 # the D_init it was built from
    pa.field("descriptors", pa.list_(pa.string())),   # "an emotion of happiness (p = 0.71)", best first
    *_TEXT_USAGE,
])

# FACS knowledge per label set and per expression x AU pairing (SSM Table S4); sample_id holds the asset id,
# e.g. "basic7" (kind "texts") or "basic7+bp4d12" (kind "prior").
FACS = _schema("facs", [
    pa.field("kind", pa.string()),
    pa.field("label_set", pa.string()),
    pa.field("au_set", pa.string()),
    pa.field("names", pa.list_(pa.string())),
    pa.field("au_names", pa.list_(pa.string())),
    pa.field("texts", pa.list_(pa.string())),
    pa.field("words", pa.list_(pa.string())),
    pa.field("standalone", pa.list_(pa.string())),
    pa.field("compound", pa.list_(pa.string())),
    pa.field("descriptors", pa.list_(pa.string())),
    pa.field("au_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("prior", pa.list_(pa.list_(pa.float32()))),             # K expressions x M AUs
    pa.field("prior_normalised", pa.list_(pa.list_(pa.float32()))),  # rows sum to 1
])

# One utterance (IEMOCAP): 16 kHz mono 16-bit PCM, little-endian, and its transcript.
AUDIO = _schema("audio", [
    pa.field("waveform", pa.binary()),                # int16 PCM samples
    pa.field("sample_rate", pa.int32()),
    pa.field("num_samples", pa.int32()),
    pa.field("transcript", pa.string()),
])

# Frozen vision backbone outputs, so that `train --from features` trains only the heads. Each array is stored as
# raw little-endian float16 bytes plus its shape; an array whose backbone is not configured is null.
FEATURES = _schema("features", [
    pa.field("visual_tokens", pa.binary()),           # VideoMAE patch tokens, shape (views, T', H'*W', D)
    pa.field("visual_shape", pa.list_(pa.int32())),
    pa.field("frame_features", pa.binary()),          # CLIP image embedding per frame, shape (views, T, D)
    pa.field("frame_shape", pa.list_(pa.int32())),
    pa.field("encoders", pa.string()),                # JSON: which checkpoint made each array
])

# Text encoder token embeddings of one text version (a separate stage, so a new LLM text never redoes vision).
TEXT_FEATURES = _schema("text_features", [
    pa.field("text_tokens", pa.binary()),             # shape (L, D): the real tokens only, no padding
    pa.field("text_shape", pa.list_(pa.int32())),
    pa.field("text", pa.string()),                    # the text that was embedded
    pa.field("encoder", pa.string()),
])

# Frozen speech and text encoder tokens of each utterance (MGCMA `--from features`).
AUDIO_FEATURES = _schema("audio_features", [
    pa.field("audio_tokens", pa.binary()),            # speech encoder frames, shape (frames, D)
    pa.field("audio_shape", pa.list_(pa.int32())),
    pa.field("text_tokens", pa.binary()),             # the transcript's tokens, shape (L, D)
    pa.field("text_shape", pa.list_(pa.int32())),
    pa.field("encoders", pa.string()),
])

SCHEMAS: dict[str, pa.Schema] = {"index": INDEX, "frames": FRAMES, "faces": FACES, "captions": CAPTIONS,
                                 "emotions": EMOTIONS, "cate": CATE, "facs": FACS, "audio": AUDIO,
                                 "features": FEATURES, "text_features": TEXT_FEATURES,
                                 "audio_features": AUDIO_FEATURES}


def schema_for(stage: str) -> pa.Schema:
    return SCHEMAS[stage]
