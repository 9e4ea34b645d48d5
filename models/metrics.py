"""Evaluation metrics reported by the trainer (DESIGN.md §8).

Expression recognition: UAR (mean per-class recall; IEMOCAP "UA") and WAR (accuracy; IEMOCAP "WA"), per-class
recall and confusion matrices. Action units: per-AU F1 over multi-label targets where NaN marks an unknown label,
plus the per-AU threshold search SSM uses. Everything takes plain arrays (numpy or lists) and returns numpy values
or JSON-ready dicts; bad input raises ValueError with a message naming the offending argument.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .figures import new_figure, save_figure

DEFAULT_THRESHOLD_GRID = np.linspace(0.05, 0.95, 19)


def _class_labels(values, name: str, num_classes: int | None = None) -> np.ndarray:
    """A 1-D int64 array of class indices, checked to lie in [0, num_classes)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)) \
                or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if num_classes is not None and array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{name} holds class indices outside [0, {num_classes}): "
                         f"min {array.min()}, max {array.max()}")
    return array


def _paired_labels(y_true, y_pred, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    true = _class_labels(y_true, "y_true", num_classes)
    pred = _class_labels(y_pred, "y_pred", num_classes)
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.size} vs {pred.size}")
    if true.size == 0:
        raise ValueError("no samples to evaluate: y_true is empty")
    return true, pred


def _square_matrix(cm, name: str = "cm") -> np.ndarray:
    matrix = np.asarray(cm)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square (K, K) matrix, got shape {matrix.shape}")
    return matrix


def _check_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for {num_classes} classes")
    return names


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts; row = true class, column = predicted class."""
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    true, pred = _paired_labels(y_true, y_pred, num_classes)
    flat = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class_recall(cm) -> np.ndarray:
    """Recall per true class (diagonal / row sum); NaN for a class with no samples."""
    matrix = _square_matrix(cm).astype(np.float64)
    support = matrix.sum(axis=1)
    recall = np.full(matrix.shape[0], np.nan)
    present = support > 0
    recall[present] = np.diag(matrix)[present] / support[present]
    return recall


def uar(y_true, y_pred, num_classes: int) -> float:
    """Unweighted average recall (IEMOCAP UA): mean recall over the classes present in y_true."""
    return float(np.nanmean(per_class_recall(confusion_matrix(y_true, y_pred, num_classes))))


def war(y_true, y_pred) -> float:
    """Weighted average recall, i.e. accuracy (IEMOCAP WA)."""
    true, pred = _paired_labels(y_true, y_pred, None)
    return float(np.mean(true == pred))


def expression_report(y_true, y_pred, class_names: Sequence[str]) -> dict:
    """JSON-ready summary: UAR, WAR, per-class recall (None for a class absent from y_true), confusion, support."""
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty")
    cm = confusion_matrix(y_true, y_pred, len(names))
    recall = per_class_recall(cm)
    return {
        "uar": float(np.nanmean(recall)),
        "war": float(np.trace(cm) / cm.sum()),
        "per_class_recall": {name: (None if np.isnan(r) else float(r)) for name, r in zip(names, recall)},
        "confusion": cm.tolist(),
        "support": {name: int(n) for name, n in zip(names, cm.sum(axis=1))},
    }


def _au_arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """(N, M) float targets (0, 1 or NaN) and (N, M) finite scores."""
    true = np.asarray(y_true, dtype=np.float64)
    score = np.asarray(scores, dtype=np.float64)
    if true.ndim != 2:
        raise ValueError(f"AU labels must be an (N, M) matrix, got shape {true.shape}")
    if score.shape != true.shape:
        raise ValueError(f"AU scores shape {score.shape} does not match labels shape {true.shape}")
    known = true[~np.isnan(true)]
    if not np.all((known == 0) | (known == 1)):
        raise ValueError("AU labels must be 0, 1 or NaN (unknown)")
    if not np.all(np.isfinite(score)):
        raise ValueError("AU scores contain NaN or infinite values")
    return true, score


def _au_thresholds(threshold, num_aus: int) -> np.ndarray:
    values = np.asarray(threshold, dtype=np.float64)
    if values.ndim == 0:
        return np.full(num_aus, float(values))
    if values.shape != (num_aus,):
        raise ValueError(f"expected one threshold or {num_aus} (one per AU), got shape {values.shape}")
    return values


def _f1_from_predictions(true: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """F1 per AU over the last two axes (N, M), ignoring NaN labels.

    NaN for an AU without a single known label; 0.0 when an AU has known labels but no positives either true or
    predicted (scikit-learn's zero_division default).
    """
    known = ~np.isnan(true)
    positive = known & (true == 1)
    tp = np.sum(predicted & positive, axis=-2)
    fp = np.sum(predicted & known & ~positive, axis=-2)
    fn = np.sum(~predicted & positive, axis=-2)
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(denominator.shape), where=denominator > 0)
    return np.where(known.any(axis=-2), f1, np.nan)


def au_f1(y_true, scores, threshold=0.5) -> np.ndarray:
    """Per-AU F1 (shape (M,)) of scores >= threshold against multi-label targets; NaN targets are ignored.

    threshold is one value for every AU or one per AU.
    """
    true, score = _au_arrays(y_true, scores)
    return _f1_from_predictions(true, score >= _au_thresholds(threshold, true.shape[1]))


def search_thresholds(y_true, scores, grid=DEFAULT_THRESHOLD_GRID) -> np.ndarray:
    """Per-AU threshold from grid maximising F1 (the lowest on ties); grid[0] for an AU with no known labels."""
    true, score = _au_arrays(y_true, scores)
    candidates = np.asarray(grid, dtype=np.float64).ravel()
    if candidates.size == 0:
        raise ValueError("threshold grid is empty")
    predicted = score[None, :, :] >= candidates[:, None, None]          # (G, N, M)
    f1 = np.nan_to_num(_f1_from_predictions(true[None], predicted), nan=0.0)   # (G, M)
    return candidates[np.argmax(f1, axis=0)]


def au_report(y_true, scores, au_names: Sequence[str], thresholds=None) -> dict:
    """JSON-ready per-AU F1 (None where undefined), their mean, and the thresholds used (0.5 unless given)."""
    true, score = _au_arrays(y_true, scores)
    names = _check_names(au_names, true.shape[1])
    used = _au_thresholds(0.5 if thresholds is None else thresholds, len(names))
    f1 = _f1_from_predictions(true, score >= used)
    defined = ~np.isnan(f1)
    return {
        "f1": {name: (float(v) if ok else None) for name, v, ok in zip(names, f1, defined)},
        "mean_f1": float(f1[defined].mean()) if defined.any() else None,
        "thresholds": {name: float(t) for name, t in zip(names, used)},
    }


def _row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum, so the diagonal is per-class recall; empty rows stay zero."""
    support = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(matrix, support, out=np.zeros(matrix.shape), where=support > 0)


def confusion_table(cm, class_names: Sequence[str], normalise: bool = True) -> str:
    """Plain-text confusion matrix: a header, then one row per true class with its support and recall.

    With normalise the cells are row percentages (the diagonal is the class recall); otherwise raw counts.
    """
    matrix = _square_matrix(cm)
    names = _check_names(class_names, matrix.shape[0])
    recall = per_class_recall(matrix)
    support = matrix.sum(axis=1)
    cells = (
        [[f"{v:.1f}" for v in row] for row in 100 * _row_normalised(matrix)] if normalise
        else [[str(int(v)) for v in row] for row in matrix]
    )
    header = ["true \\ pred", *names, "n", "recall"]
    rows = [
        [name, *row_cells, str(int(n)), "-" if np.isnan(r) else f"{100 * r:.1f}%"]
        for name, row_cells, n, r in zip(names, cells, support, recall)
    ]
    widths = [max(len(line[col]) for line in [header, *rows]) for col in range(len(header))]
    lines = [header[0].ljust(widths[0]) + "  " + "  ".join(h.rjust(w) for h, w in zip(header[1:], widths[1:]))]
    lines += [row[0].ljust(widths[0]) + "  " + "  ".join(c.rjust(w) for c, w in zip(row[1:], widths[1:]))
              for row in rows]
    return "\n".join(lines)


def save_confusion_png(cm, class_names: Sequence[str], path, normalise: bool = True, title: str = "") -> None:
    """Write the confusion matrix as an annotated heat map PNG (rows = true class)."""
    matrix = _square_matrix(cm)
    names = _check_names(class_names, matrix.shape[0])
    values = _row_normalised(matrix) if normalise else matrix.astype(np.float64)
    size = 1.5 + 0.6 * len(names)
    figure = new_figure(size + 1.5, size)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalise else max(values.max(), 1.0))
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if title:
        axes.set_title(title)
    dark = values > 0.5 * (1.0 if normalise else max(values.max(), 1.0))
    for row in range(len(names)):
        for col in range(len(names)):
            text = f"{values[row, col]:.2f}" if normalise else str(int(matrix[row, col]))
            axes.text(col, row, text, ha="center", va="center", fontsize=8,
                      color="white" if dark[row, col] else "black")
    figure.tight_layout()
    save_figure(figure, Path(path))


def multi_view_average(logits_per_view) -> np.ndarray:
    """(V, N, K) logits from V test-time views -> (N, K) mean of the per-view softmax probabilities."""
    logits = np.asarray(logits_per_view, dtype=np.float64)
    if logits.ndim != 3 or logits.shape[0] == 0:
        raise ValueError(f"expected (views, samples, classes) logits with at least one view, got shape {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or infinite values")
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))   # subtract the max: exp cannot overflow
    return (shifted / shifted.sum(axis=-1, keepdims=True)).mean(axis=0)


def cluster_scores(embeddings, labels) -> dict[str, float]:
    """Davies-Bouldin (lower is better) and Calinski-Harabasz (higher is better) scores of embeddings (N, D)
    clustered by labels (N,), as scikit-learn defines them."""
    points = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if points.ndim != 2 or labels.shape != (points.shape[0],):
        raise ValueError(f"embeddings must be (N, D) and labels (N,), got {points.shape} and {labels.shape}")
    clusters, assignment = np.unique(labels, return_inverse=True)
    count, total = len(clusters), points.shape[0]
    if not 2 <= count < total:
        raise ValueError(f"cluster scores need 2 to N - 1 clusters, got {count} for N = {total}")
    sizes = np.bincount(assignment)
    centroids = np.zeros((count, points.shape[1]))
    np.add.at(centroids, assignment, points)
    centroids /= sizes[:, None]

    offsets = points - centroids[assignment]
    scatter = np.bincount(assignment, weights=np.linalg.norm(offsets, axis=1)) / sizes
    separation = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    if np.allclose(scatter, 0) or np.allclose(separation, 0):
        davies_bouldin = 0.0
    else:
        separation[separation == 0] = np.inf
        ratios = (scatter[:, None] + scatter[None]) / separation
        np.fill_diagonal(ratios, -np.inf)
        davies_bouldin = float(ratios.max(axis=1).mean())

    within = float((offsets ** 2).sum())
    between = float((sizes * ((centroids - points.mean(axis=0)) ** 2).sum(-1)).sum())
    calinski_harabasz = 1.0 if within == 0 else between * (total - count) / (within * (count - 1))
    return {"davies_bouldin": davies_bouldin, "calinski_harabasz": calinski_harabasz}
