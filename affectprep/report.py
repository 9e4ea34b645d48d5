"""`affectprep report`: one static HTML page to look at a project's datasets, opened from disk (no server).

Per dataset: counts per stage and status, class balance per split, what the faces stage did (backend, landmark
source, frames where the face was detected), a gallery of clips (aligned crops with their landmarks drawn, the
caption, the top-3 emotions, the CATE text of every stored version side by side, the label), the failed samples
with their errors and a thumbnail of their media where it can be read, and every text version with its tokens and
cost. Images are embedded as data URIs, so the page is one file to open, copy or send.

Counts and keys come from the pipeline's own status (`pipeline.dag.describe`) and text versions
(`pipeline.text_versions`); the rows from the stores those name. It runs no stage.
"""
from __future__ import annotations

import base64
import html
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from affectprep import schema as S
from affectprep.cli import human_size
from affectprep.config import ProjectConfig
from affectprep.store import Store, list_keys

THUMB = 96                   # pixels per frame in a gallery strip
FAILURE_THUMBNAILS = 60      # failed samples that get a thumbnail of their media (all are listed)
FAILURES_LISTED = 500        # per dataset; the rest are counted
# The iBUG 68-point contours (first, last, closed) drawn on the crops: jaw, brows, nose, eyes, lips.
_CONTOURS = [(0, 16, False), (17, 21, False), (22, 26, False), (27, 30, False), (30, 35, True), (36, 41, True),
             (42, 47, True), (48, 59, True), (60, 67, True)]


def write_report(project: ProjectConfig, out: Path, datasets: list[str] | None = None, samples: int = 12) -> Path:
    """Write `out`/index.html for the project's datasets (all, or `datasets`); returns its path."""
    from affectprep.pipeline.dag import describe

    if samples < 0:
        raise ValueError(f"--samples must not be negative, got {samples}")
    sections = [_dataset_section(project, entry, samples) for entry in describe(project, datasets)]
    page = _PAGE.format(title=_e(f"affectprep report: {', '.join(e['dataset'] for e in sections)}"),
                        css=_CSS, body="\n".join(section["html"] for section in sections))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    tmp = out / f".index.html.{os.getpid()}.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- one dataset ---------------------------------------------------------------------------------------------------

def _dataset_section(project: ProjectConfig, entry: dict[str, Any], samples: int) -> dict[str, Any]:
    name = entry["dataset"]
    head = f"<h2 id='{_e(name)}'>{_e(name)} <small>{_e(entry['kind'])} · {_e(entry['root'])}</small></h2>"
    if entry["index"] is None:
        return {"dataset": name, "html": f"<section>{head}<p class='note'>The index is not built yet: run "
                                          f"<code>affectprep run</code>.</p></section>"}
    stores = {"index": Store(project.cache, name, "index", entry["index"]["key"])}
    # A stage made per test fold (emotions, CATE) has one store per fold: a clip is shown with its own fold's,
    # what the model tested on that fold reads.
    stores.update({(s["stage"] if s["test_fold"] is None else (s["stage"], s["test_fold"])):
                   Store(project.cache, name, s["stage"], s["key"]) for s in entry["stages"]})
    index = {row["sample_id"]: row for row in stores["index"].read(
        ["sample_id", "media_path", "media_kind", "frame_start", "label", "label_name", "split", "fold",
         "status"]).to_pylist()}
    for row in index.values():   # the index holds media paths relative to the dataset root
        if row["media_path"]:
            row["media_path"] = str(Path(entry["root"]) / row["media_path"])
    parts = [head, _stage_table(entry), _balance_table(index), _faces_summary(stores.get("faces")),
             _gallery(project, name, stores, index, samples), _failures(entry, index), _text_table(project, name)]
    return {"dataset": name, "html": "<section>" + "\n".join(p for p in parts if p) + "</section>"}


def _stage_table(entry: dict[str, Any]) -> str:
    index = entry["index"]
    rows = [f"<tr><td>index</td><td>{index['ok'] + index['failed']}</td><td>{index['ok']}</td>"
            f"<td class='{_bad(index['failed'])}'>{index['failed']}</td><td>-</td><td>-</td>"
            f"<td>{human_size(index['bytes'])}</td><td><code>{_e(index['key'])}</code></td></tr>"]
    for s in entry["stages"]:
        if s["total"] == 0 and not s["bytes"]:   # a stage for other media (audio for videos): nothing to show
            continue
        rows.append(f"<tr><td>{_e(s['name'])}</td><td>{s['total']}</td><td>{s['done']}</td>"
                    f"<td class='{_bad(s['failed'])}'>{s['failed']}</td><td>{s['blocked']}</td><td>{s['pending']}</td>"
                    f"<td>{human_size(s['bytes'])}</td><td><code>{_e(s['key'])}</code></td></tr>")
    excluded = sum(index["excluded"].values())
    note = f"<p class='note'>{excluded} annotated sample(s) excluded by the dataset's protocol.</p>" if excluded else ""
    return ("<h3>Stages</h3><table class='stages'><tr><th>stage</th><th>samples</th><th>done</th><th>failed</th>"
            "<th>blocked</th><th>pending</th><th>size</th><th>key</th></tr>" + "".join(rows) + "</table>" + note)


def _balance_table(index: dict[str, dict[str, Any]]) -> str:
    """Samples per class in each split: the official split where the dataset has one, else each fold's test set."""
    counts: dict[str, Counter] = defaultdict(Counter)
    classes: dict[int, str] = {}
    for row in index.values():
        if row["status"] != S.STATUS_OK or row["label"] is None or row["label"] < 0:
            continue
        classes[row["label"]] = row["label_name"]
        split = row["split"] or (f"fold {row['fold']} test" if row["fold"] else "all")
        counts[split][row["label"]] += 1
    if not counts:
        return ""
    order = sorted(classes)
    most = max(max(c.values()) for c in counts.values())
    header = "".join(f"<th>{_e(classes[k])}</th>" for k in order)
    rows = []
    for split in sorted(counts):
        cells = "".join(f"<td><span class='bar' style='width:{40 * counts[split][k] / most:.0f}px'></span>"
                        f"{counts[split][k]}</td>" for k in order)
        rows.append(f"<tr><td>{_e(split)}</td>{cells}<td>{sum(counts[split].values())}</td></tr>")
    return (f"<h3>Class balance</h3><table class='balance'><tr><th>split</th>{header}<th>all</th></tr>"
            + "".join(rows) + "</table>")


def _faces_summary(faces: Store | None) -> str:
    if faces is None or not faces.exists():
        return ""
    table = faces.read(["backend", "landmark_source", "detected"], status=S.STATUS_OK)
    if table.num_rows == 0:
        return ""
    backends = Counter(zip(table.column("backend").to_pylist(), table.column("landmark_source").to_pylist()))
    detected = [np.mean(d) for d in table.column("detected").to_pylist() if d]
    made = ", ".join(f"{count} by <b>{_e(b)}</b> (landmarks: {_e(src)})" for (b, src), count in backends.items())
    weak = sum(share < 0.5 for share in detected)
    return (f"<h3>Faces</h3><p>{table.num_rows} clips: {made}. The detector found the face in "
            f"{100 * float(np.mean(detected)):.1f}% of the sampled frames (the rest filled in from their "
            f"neighbours); {weak} clip(s) had it in fewer than half.</p>")


def _gallery(project: ProjectConfig, dataset: str, stores: dict[str, Store], index: dict[str, dict[str, Any]],
             samples: int) -> str:
    faces = stores.get("faces")
    if samples == 0 or faces is None or not faces.exists():
        return ""
    ok = sorted(sid for sid, status in faces.statuses().items() if status == S.STATUS_OK and sid in index)
    chosen = _spread_over_classes(ok, index, samples)
    if not chosen:
        return ""
    crops = {r["sample_id"]: r for r in faces.read(["sample_id", "crops", "landmarks", "size", "frames_per_view"],
                                                   ids=chosen).to_pylist()}
    captions = _column(stores.get("captions"), chosen, "caption")
    def of_fold(stage: str, sid: str) -> Store | None:
        return stores.get((stage, index[sid]["fold"])) or stores.get(stage)

    emotions = {sid: next(iter(_rows(of_fold("emotions", sid), [sid], ["sample_id", "top_names", "top_probs",
                                                                         "in_fold"])), None) for sid in chosen}
    current = {store.key for key, store in stores.items() if (key[0] if isinstance(key, tuple) else key) == "cate"}
    cate_versions = []
    for key in list_keys(project.cache, dataset, "cate"):
        store = Store(project.cache, dataset, "cate", key)
        cate_versions.append((key, (store.read_config() or {}).get("test_fold"), _column(store, chosen, "text")))
    items = []
    for sid in chosen:
        row, label = crops[sid], index[sid]["label_name"]
        top = emotions.get(sid)
        top_html = ("<ol class='top'>" + "".join(
            f"<li class='{'hit' if n == label else ''}'>{_e(n)} <b>{p:.2f}</b></li>"
            for n, p in zip(top["top_names"], top["top_probs"])) + "</ol>"
                    + (" <span class='warn'>in-fold</span>" if top["in_fold"] else "")) if top else "<p>-</p>"
        texts = "".join(
            f"<div class='text{' current' if key in current else ''}'><div class='version'>cate "
            f"<code>{_e(key)}</code>{f' fold {fold}' if fold is not None else ''}"
            f"{' (current)' if key in current else ''}</div>{_e(found.get(sid, '-'))}</div>"
            for key, fold, found in cate_versions if fold in (None, index[sid]["fold"]))
        items.append(
            f"<div class='clip' data-sample='{_e(sid)}'>"
            f"<div class='clip-head'><b>{_e(sid)}</b> · label <b class='label'>{_e(label)}</b></div>"
            f"<img class='strip' alt='aligned crops of {_e(sid)} with landmarks' src='{_strip(row)}'>"
            f"<div class='clip-body'><div><div class='version'>caption</div>{_e(captions.get(sid, '-'))}</div>"
            f"<div><div class='version'>top-3 emotions</div>{top_html}</div></div>"
            f"<div class='texts'>{texts}</div></div>")
    return (f"<h3>Gallery <small>{len(chosen)} of {len(ok)} clips, spread over the classes</small></h3>"
            f"<div class='gallery'>{''.join(items)}</div>")


def _spread_over_classes(ids: list[str], index: dict[str, dict[str, Any]], count: int) -> list[str]:
    """Up to `count` ids taken in turn from each class (by sample id within a class), so every class shows."""
    by_class: dict[Any, list[str]] = defaultdict(list)
    for sid in ids:
        by_class[index[sid]["label"]].append(sid)
    queues = [by_class[k] for k in sorted(by_class, key=lambda k: (k is None, k))]
    chosen: list[str] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def _strip(row: dict[str, Any]) -> str:
    """The first view's crops side by side with their landmarks drawn, as a JPEG data URI."""
    size, count = row["size"], row["frames_per_view"] or len(row["crops"])
    tiles = []
    for crop, flat in zip(row["crops"][:count], row["landmarks"][:count]):
        image = cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            image = np.zeros((THUMB, THUMB, 3), np.uint8)
        image = cv2.resize(image, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
        points = np.asarray(flat, np.float32).reshape(-1, 2) * (THUMB / size)
        if len(points) == S.NUM_LANDMARKS:
            for first, last, closed in _CONTOURS:
                line = np.round(points[first:last + 1] * 4).astype(np.int32)  # 2 fractional bits
                cv2.polylines(image, [line], closed, (80, 255, 80), 1, cv2.LINE_AA, shift=2)
        tiles.append(image)
    return _jpeg_uri(np.concatenate(tiles, axis=1))


def _failures(entry: dict[str, Any], index: dict[str, dict[str, Any]]) -> str:
    failed = [("index", f["sample_id"], f["error"]) for f in entry["index"]["failures"]]
    failed += [(s["stage"], f["sample_id"], f["error"]) for s in entry["stages"] for f in s["failures"]]
    if not failed:
        return "<h3>Failed samples</h3><p>None.</p>"
    rows = []
    for n, (stage, sid, error) in enumerate(failed[:FAILURES_LISTED]):
        thumb = _thumbnail(index.get(sid)) if n < FAILURE_THUMBNAILS else None
        image = f"<img class='thumb' alt='first frame of {_e(sid)}' src='{thumb}'>" if thumb else "<span>-</span>"
        rows.append(f"<tr class='failure'><td>{image}</td><td><b>{_e(sid)}</b></td><td>{_e(stage)}</td>"
                    f"<td>{_e(error or '')}</td></tr>")
    more = (f"<p class='note'>and {len(failed) - FAILURES_LISTED} more: "
            f"<code>affectprep status --json</code> lists them all.</p>" if len(failed) > FAILURES_LISTED else "")
    return (f"<h3>Failed samples <small>{len(failed)}</small></h3><table class='failures'><tr><th>media</th>"
            f"<th>sample</th><th>stage</th><th>error</th></tr>{''.join(rows)}</table>{more}")


def _thumbnail(row: dict[str, Any] | None) -> str | None:
    """The sample's first frame, small, or None where its media cannot be read (that may be why it failed)."""
    from affectprep.pipeline.media import read_frames

    if row is None or not row.get("media_path") or row.get("media_kind") not in ("video", "frames", "image"):
        return None
    try:
        frame = read_frames(Path(row["media_path"]), row["media_kind"], [max(0, row["frame_start"] or 0)])[0]
    except Exception:  # noqa: BLE001 - unreadable media is what many failures are about; the row says why
        return None
    scale = 2 * THUMB / max(frame.shape[:2])
    small = cv2.resize(frame, (max(1, round(frame.shape[1] * scale)), max(1, round(frame.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    return _jpeg_uri(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))


def _text_table(project: ProjectConfig, dataset: str) -> str:
    from affectprep.pipeline.text_versions import text_versions

    versions = text_versions(project, [dataset])
    if not versions:
        return ""
    rows = "".join(
        f"<tr class='{'current' if v['current'] else ''}'><td>{_e(v['stage'])}</td><td><code>{_e(v['version'])}"
        f"</code></td><td>{'' if v['test_fold'] is None else v['test_fold']}</td><td>{_e(v['backend'])}</td><td>{_e(v['prompt'] or '-')}</td><td>{v['ok']}</td>"
        f"<td class='{_bad(v['failed'])}'>{v['failed']}</td><td>{v['prompt_tokens']:,}</td>"
        f"<td>{v['completion_tokens']:,}</td><td>{v['cost_usd']:.4f}</td><td>{'yes' if v['current'] else ''}</td></tr>"
        for v in versions)
    return ("<h3>Text versions</h3><table class='versions'><tr><th>stage</th><th>version</th><th>test fold</th><th>backend</th>"
            "<th>prompt</th><th>ok</th><th>failed</th><th>prompt tokens</th><th>completion tokens</th>"
            f"<th>cost USD</th><th>current</th></tr>{rows}</table>")


# ---- helpers -------------------------------------------------------------------------------------------------------

def _rows(store: Store | None, ids: list[str], columns: list[str]) -> list[dict[str, Any]]:
    if store is None or not store.exists():
        return []
    return store.read(columns, ids=ids, status=S.STATUS_OK).to_pylist()


def _column(store: Store | None, ids: list[str], column: str) -> dict[str, Any]:
    return {r["sample_id"]: r[column] for r in _rows(store, ids, ["sample_id", column])}


def _jpeg_uri(bgr: np.ndarray, quality: int = 85) -> str:
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a report image as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bad(count: int) -> str:
    return "bad" if count else ""


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; } h2 { border-bottom: 2px solid #ccc; margin-top: 2em; } h2 small, h3 small { color: #777;
font-weight: normal; font-size: .75em; }
table { border-collapse: collapse; margin: .5em 0 1em; background: #fff; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eee; } td.bad { color: #b00; font-weight: bold; } tr.current td { background: #eef6ff; }
.bar { display: inline-block; height: 9px; background: #7aa7d8; margin-right: 4px; }
.note { color: #666; } .warn { color: #b00; font-weight: bold; }
.gallery { display: flex; flex-direction: column; gap: 12px; }
.clip { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.clip-head { margin-bottom: 4px; } .label { color: #05a; }
.strip { display: block; max-width: 100%; height: auto; image-rendering: auto; }
.clip-body { display: grid; grid-template-columns: 3fr 1fr; gap: 12px; margin-top: 6px; }
.texts { display: flex; gap: 8px; margin-top: 6px; } .text { flex: 1; background: #f4f4f4; padding: 4px 6px; }
.text.current { background: #eef6ff; } .version { color: #777; font-size: .85em; }
.top { margin: 0; padding-left: 1.4em; } .top li.hit { color: #070; }
img.thumb { max-height: 96px; }
"""
