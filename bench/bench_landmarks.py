"""Landmark accuracy per face backend, against ground truth that is computed, not annotated.

Real face photos that ship inside installed packages (skimage's astronaut, matplotlib's Grace Hopper) are deformed
by known warps: a local, expression-like displacement field (brows raised or lowered, lip corners pulled, jaw
dropped; smooth Gaussian pulls around the landmarks), then a random affine map (rotation, scale, shear, shift)
onto a 640x480 grey canvas. The true landmarks of a warped frame are the reference landmarks of the photo moved by
the same maps (the displacement field inverted by fixed-point iteration, then the affine map).

Reference landmarks: dlib's 68-point predictor on the unwarped photo (the only real 68-point model available
offline here), checked against 8 points of the astronaut located by eye (pipeline/demo.py, `_POINTS`). That
reference favours dlib (its own error on the unwarped photo counts as zero, and an error that moves with the face
cancels), so the astronaut is also scored against the points located by eye alone, moved by the same maps: no
backend made them, so that column ranks the backends fairly; its floor is the reference check printed first (how
far the points placed by eye sit from dlib's landmarks on the unwarped photo).

NME = mean point-to-point error / inter-ocular distance (outer eye corners 36-45, the 300-W convention); a frame
where a backend finds no face counts as a miss and is left out of its NME.
Usage: python bench/bench_landmarks.py [--warps N]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np

from affectprep.pipeline.backends.face import dlib_installed, fan_weights_present, load_face_backend
from affectprep.pipeline.demo import _POINTS

CANVAS = (640, 480)
# Astronaut points located by eye (for the demo's warps, pipeline/demo.py) that match a 68-point definition: the
# inner brow ends, the eyelids' middles and the lips' midline. The demo's other points (outer brows, nostrils,
# mouth corners, chin) sit 9-19% IOD from the nearest 68-point landmark by definition and are left out.
HAND_POINTS = {"brow_l_in": [21], "brow_r_in": [22], "lid_l": [37, 38], "lid_r": [43, 44],
               "low_lid_l": [40, 41], "low_lid_r": [46, 47], "lip_up": [51], "lip_low": [57]}
# Expression-like pulls: landmark indices and their displacement in inter-ocular units (x away from the face's
# vertical midline is positive).
EXPRESSIONS = {
    "brows up": ({17: (0, -0.10), 19: (0, -0.12), 21: (0, -0.10), 22: (0, -0.10), 24: (0, -0.12), 26: (0, -0.10)}),
    "brows down": ({19: (0, 0.07), 21: (-0.05, 0.08), 22: (-0.05, 0.08), 24: (0, 0.07)}),
    "smile": ({48: (0.08, -0.08), 54: (0.08, -0.08)}),
    "jaw drop": ({57: (0, 0.15), 8: (0, 0.15), 7: (0, 0.13), 9: (0, 0.13), 66: (0, 0.12)}),
    "lip stretch": ({48: (0.10, 0.02), 54: (0.10, 0.02)}),
}


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    found = {"astronaut": np.ascontiguousarray(data.astronaut())}
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        found["grace_hopper"] = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    except (ImportError, cv2.error):
        pass
    return found


def nme(found: np.ndarray, truth: np.ndarray, iod: float) -> float:
    return float(np.linalg.norm(found - truth, axis=-1).mean() / iod)


def displacement(moves: dict[int, tuple[float, float]], reference: np.ndarray, iod: float):
    """A smooth field (x, y) -> (dx, dy): a Gaussian pull of width 0.18 IOD around each moved landmark."""
    midline = reference[27:31, 0].mean()
    centres = np.array([reference[i] for i in moves], np.float64)
    shifts = np.array([(np.sign(reference[i, 0] - midline) * dx * iod, dy * iod) for i, (dx, dy) in moves.items()])
    sigma = 0.18 * iod

    def field(x, y):
        weights = np.exp(-((x[..., None] - centres[:, 0]) ** 2 + (y[..., None] - centres[:, 1]) ** 2)
                         / (2 * sigma ** 2))
        return (weights * shifts[:, 0]).sum(-1), (weights * shifts[:, 1]).sum(-1)
    return field


def deform(photo: np.ndarray, field) -> np.ndarray:
    """The photo with each output pixel p showing the photo at p - field(p) (a backward map)."""
    height, width = photo.shape[:2]
    gx, gy = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    dx, dy = field(gx, gy)
    return cv2.remap(photo, (gx - dx).astype(np.float32), (gy - dy).astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def moved(points: np.ndarray, field) -> np.ndarray:
    """Where the deformation takes each photo point q: the p with p - field(p) = q (fixed-point iteration)."""
    p = points.astype(np.float64).copy()
    for _ in range(50):
        dx, dy = field(p[:, 0], p[:, 1])
        p = points + np.stack([dx, dy], axis=1)
    return p


def random_affine(rng: np.random.Generator, centre: np.ndarray, face_size: float) -> np.ndarray:
    """Rotation +-20 degrees, the face scaled to 20-45% of the canvas height, shear up to 0.1, anywhere on it."""
    angle = np.deg2rad(rng.uniform(-20, 20))
    scale = rng.uniform(0.20, 0.45) * CANVAS[1] / face_size
    shear = rng.uniform(-0.1, 0.1)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ \
        np.array([[1, shear], [0, 1]])
    target = np.array([rng.uniform(0.3, 0.7) * CANVAS[0], rng.uniform(0.35, 0.65) * CANVAS[1]])
    return np.concatenate([linear, (target - linear @ centre)[:, None]], axis=1)


def warped_set(count: int, reference_backend) -> list[dict]:
    """`count` warps of each photo: frame, true 68 landmarks, true hand points (astronaut), IOD of the truth."""
    rng = np.random.default_rng(0)
    items = []
    for name, photo in photos().items():
        (ref,) = reference_backend.detect(photo[None])
        if ref is None:
            print(f"  {name}: dlib finds no face in the unwarped photo; left out")
            continue
        reference = ref.landmarks.astype(np.float64)
        iod = float(np.linalg.norm(reference[45] - reference[36]))
        hand = np.array([_POINTS[k] for k in HAND_POINTS], np.float64) if name == "astronaut" else None
        if hand is not None:
            check = np.stack([reference[idx].mean(0) for idx in HAND_POINTS.values()])
            print(f"  reference check, astronaut: dlib on the unwarped photo vs {len(hand)} points located by eye: "
                  f"{100 * nme(check, hand, iod):.1f}% IOD")
        face_size = float(np.ptp(reference[:, 1]))
        for i in range(count):
            expression = list(EXPRESSIONS)[i % len(EXPRESSIONS)] if i % 3 else None  # a third: affine only
            field = displacement(EXPRESSIONS[expression], reference, iod) if expression else None
            image = deform(photo, field) if field else photo
            truth = moved(reference, field) if field else reference
            truth_hand = (moved(hand, field) if field else hand) if hand is not None else None
            affine = random_affine(rng, reference.mean(0), face_size)
            frame = cv2.warpAffine(image, affine, CANVAS, flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=(120, 120, 120))
            apply = lambda pts: pts @ affine[:, :2].T + affine[:, 2]  # noqa: E731
            truth = apply(truth)
            items.append({"photo": name, "expression": expression or "none", "frame": frame, "truth": truth,
                          "hand": apply(truth_hand) if truth_hand is not None else None,
                          "iod": float(np.linalg.norm(truth[45] - truth[36]))})
    return items


def score(backend, items: list[dict]) -> dict:
    errors, hand_errors, per_photo, misses = [], [], {}, 0
    for item in items:
        (found,) = backend.detect(item["frame"][None])
        if found is None:
            misses += 1
            continue
        error = nme(found.landmarks, item["truth"], item["iod"])
        errors.append(error)
        per_photo.setdefault(item["photo"], []).append(error)
        if item["hand"] is not None:
            points = np.stack([found.landmarks[idx].mean(0) for idx in HAND_POINTS.values()])
            hand_errors.append(nme(points, item["hand"], item["iod"]))
    return {"nme": np.mean(errors) if errors else float("nan"), "hand": np.mean(hand_errors) if hand_errors else
            float("nan"), "photos": {k: np.mean(v) for k, v in per_photo.items()}, "misses": misses,
            "frames": len(items)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warps", type=int, default=30, help="warped frames per photo")
    args = parser.parse_args()
    if not dlib_installed():
        raise SystemExit("the reference landmarks are dlib's: pip install 'affectprep[dlib]'")
    dlib_backend = load_face_backend("dlib", min_face=0.1)
    items = warped_set(args.warps, dlib_backend)
    backends = {"haar (template)": load_face_backend("haar"), "dlib (hog)": dlib_backend}
    if fan_weights_present():
        backends["fan (sfd)"] = load_face_backend("fan", detector="sfd")
    else:
        print(f"  fan: no FAN weights in the torch hub cache ({os.environ.get('TORCH_HOME', '~/.cache/torch')}); "
              "they cannot be downloaded on this machine, so FAN is not scored here")
    photo_names = sorted({item["photo"] for item in items})
    print(f"{len(items)} warped frames ({args.warps} per photo: {', '.join(photo_names)}); "
          f"a third affine only, the rest with an expression-like deformation too")
    print(f"  {'backend':18} {'NME vs reference':>17} {'NME vs hand points':>19}  "
          + "  ".join(f"{n:>13}" for n in photo_names) + "  missed")
    for label, backend in backends.items():
        result = score(backend, items)
        print(f"  {label:18} {100 * result['nme']:16.2f}% {100 * result['hand']:18.2f}%  "
              + "  ".join(f"{100 * result['photos'].get(n, float('nan')):12.2f}%" for n in photo_names)
              + f"  {result['misses']}/{result['frames']}")


if __name__ == "__main__":
    main()
