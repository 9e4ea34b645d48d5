"""SSM's mixture-of-experts cost: a training step with MoE FFNs in the last 6 CLIP blocks against plain CLIP FFNs.

One step = forward and backward of one batch of clips per task (expressions, then AUs, each through its own private
experts), as the trainer steps. The same model is built twice from the same seed, once with `moe_layers` at its
default (6; tiny: 1) and once with 0, so the only difference is the MoE (per task a router and 4 private experts of
hidden 512 routed top-2; gamma). Sizes: tiny (the test config)
and real (CLIP ViT-B/16 towers, random init, batch 2 of 16 frames at 224 px; few steps on a CPU). Figures only.
Usage: python bench/bench_ssm_moe.py [--device cpu] [--tiny-steps 20] [--real-steps 2] [--skip-real]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import affectprep.models.ssm  # noqa: F401  (registers "ssm")
from affectprep.models.registry import create_model
from affectprep.pipeline.facs import asset_rows

from common import timed


def facs_rows() -> dict:
    rows = {row["asset_id"]: row for row in asset_rows()}
    return {"expression": rows["basic7"], "au": rows["bp4d12"], "prior": rows["basic7+bp4d12"]}


def build(tiny: bool, moe: bool, device: str):
    torch.manual_seed(0)
    return create_model("ssm", tiny=tiny, facs=facs_rows(), **({} if moe else {"moe_layers": 0})).to(device).train()


def train_step(model, frames: torch.Tensor, targets: dict, device: str) -> None:
    model.zero_grad(set_to_none=True)
    for task in ("expression", "au"):
        outputs = model(frames, task=task)
        model.loss({task: outputs}, {task: targets[task]})["loss"].backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def report(label: str, tiny: bool, batch: int, steps: int, warmup: int, device: str) -> None:
    """Median seconds per step of each variant. The two alternate step by step, so load from other processes
    on a shared machine falls on both alike."""
    models = {"plain": build(tiny, False, device), "moe": build(tiny, True, device)}
    frames = models["moe"].example_inputs(batch, generator=torch.Generator().manual_seed(1))["frames"]
    num_classes, num_aus = models["moe"].num_classes, models["moe"].num_aus
    targets = {"expression": {"labels": torch.arange(batch, device=device) % num_classes},
               "au": {"au": (torch.arange(batch * num_aus, device=device).view(batch, -1) % 2).float()}}
    results: dict[tuple[str, int], float] = {}
    for index in range(warmup + steps):
        for name, model in models.items():
            with timed((name, index), results):
                train_step(model, frames, targets, device)
    median = {name: statistics.median(results[name, i] for i in range(warmup, warmup + steps)) for name in models}
    params = {name: sum(p.numel() for p in model.parameters() if p.requires_grad) for name, model in models.items()}
    print(f"{label}: batch {batch} x {frames.shape[1]} frames, {steps} timed steps after {warmup} warm-up, "
          f"device {device}")
    print(f"  plain CLIP FFN : {median['plain'] * 1e3:9.1f} ms/step  ({params['plain']:,} trainable parameters)")
    print(f"  MoE FFN        : {median['moe'] * 1e3:9.1f} ms/step  ({params['moe']:,} trainable, "
          f"+{params['moe'] - params['plain']:,})")
    print(f"  MoE / plain    : {median['moe'] / median['plain']:9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny-steps", type=int, default=20)
    parser.add_argument("--real-steps", type=int, default=2)
    parser.add_argument("--skip-real", action="store_true", help="tiny size only")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    report("tiny", True, batch=2, steps=args.tiny_steps, warmup=3, device=args.device)
    if not args.skip_real:
        report("real (ViT-B/16, random init)", False, batch=2, steps=args.real_steps, warmup=1, device=args.device)


if __name__ == "__main__":
    main()
