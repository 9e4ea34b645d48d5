"""What every `affectprep explain` figure shares, so that the five models' outputs read alike.

- Each explanation is a pair `<sample>-<what>.png` and `<sample>-<what>.json` (the numbers drawn, so anyone can
  re-plot or test them); an explanation that does not depend on a sample (SSM's learnt matrices) drops the prefix.
- Figures are bare `Figure`s on the Agg canvas: no pyplot global state, so they work headless and in worker threads.
- One resolution, and one title convention: "sample: predicted X (p), true Y".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from torch import Tensor

from affectprep.config import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110


def new_figure(width: float, height: float, **options: Any) -> "Figure":
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("drawing figures needs matplotlib: pip install matplotlib") from None

    figure = Figure(figsize=(width, height), **options)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: "Figure", path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


def explanation_stem(out_dir: Path, what: str, sample_id: str | None = None) -> Path:
    """`out_dir/<sample>-<what>` (sample ids may hold '/', e.g. BP4D's subject/task/frame)."""
    return Path(out_dir) / (what if sample_id is None else f"{sample_id.replace('/', '_')}-{what}")


def write_explanation(figure: "Figure", record: dict[str, Any], out_dir: Path, what: str,
                      sample_id: str | None = None) -> list[Path]:
    """Save one explanation as its PNG and JSON pair; returns both paths, PNG first."""
    stem = explanation_stem(out_dir, what, sample_id)
    png = save_figure(figure, stem.with_suffix(".png"))
    payload = record if sample_id is None else {"sample_id": sample_id, **record}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    return [png, stem.with_suffix(".json")]


def prediction_title(sample_id: str, probabilities: Tensor, label_names: Sequence[str], label: int,
                     note: str = "") -> str:
    """"sample: predicted X (0.83[; note]), true Y" (no true class for an unlabelled sample, label < 0)."""
    best = int(probabilities.argmax())
    confidence = f"{float(probabilities[best]):.2f}" + (f"; {note}" if note else "")
    truth = f", true {label_names[label]}" if label >= 0 else ""
    return f"{sample_id}: predicted {label_names[best]} ({confidence}){truth}"


def displayable(frames: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised frames (..., 3, H, W) back to RGB in [0, 1], channels last, for imshow."""
    frames = frames.detach().float().cpu()
    mean_t = frames.new_tensor(mean)[:, None, None]
    std_t = frames.new_tensor(std)[:, None, None]
    return (frames * std_t + mean_t).clamp(0, 1).movedim(-3, -1).numpy()
