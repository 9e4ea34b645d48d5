"""The training recipe: one explicit accelerate loop that trains any registered model from the cached stores.

    affectprep train grace --dataset dfew --fold 1                      # one CPU or GPU
    accelerate launch --multi_gpu -m affectprep train grace ...          # several processes (GPUs; on a machine
                                                                         # without GPUs, CPU processes with gloo)

Per step, each task the model learns draws one batch (a two-task model such as SSM gets an expression batch and
an AU batch, from two datasets); each task's batch is forwarded and back-propagated in turn, under `no_sync`
except the last, so DDP reduces gradients once per step and the two forwards never overlap in one graph (the
model's loss is a sum over tasks, so this equals the joint loss). `grad_accum` micro-steps make one optimiser
step; the last window of an epoch may be shorter and is averaged over its own length. Gradients are clipped to
`clip_grad`; mixed precision comes from accelerate (bf16 or fp16 autocast, with loss scaling for fp16).

Learning rate: linear warm-up over `warmup_epochs`, then cosine to zero, per optimiser step, applied to each
parameter group's own lr (layer-wise decay lives in the groups). The model's `param_groups` decides the groups.

Checkpoints: after every epoch (after its evaluation) the full accelerate state — model, optimizer, scheduler,
every process's RNG — is saved to checkpoints/epoch-NNN; trainer_state.json inside marks it complete. The data
order and augmentation of an epoch depend only on (seed, epoch), so `--resume RUN` continues exactly where an
uninterrupted run would be: same batches, same random draws, same weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import shutil
import statistics
import time
from datetime import datetime
from itertools import count
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from torch import nn

from affectprep.config import ConfigError

from .data import DOMAINS, class_weights_from_labels, few_labels, with_domain
from .evaluate import evaluate, score, summary_line, write_results
from .layers.optim import parameter_groups
from .runs import (RunFolder, Sources, TrainConfig, build_model, git_state, make_dataset, make_loader,
                   samples_for, task_fold)

CHECKPOINTS_KEPT = 1


def train(config: TrainConfig, sources: dict[str, Sources], runs_dir: Path = Path("runs"), *,
          resume: Path | None = None, stop_after_epoch: int | None = None,
          echo: Callable[[str], None] = print) -> Path:
    """Train (or, with `resume`, continue) a run; returns its folder. `sources` maps each task to its stores.

    stop_after_epoch: end this process after that epoch's checkpoint (e.g. to fit a cluster's time limit);
    `--resume` goes on from there.
    """
    set_seed(config.seed)
    sources = {task: s.for_fold(task_fold(config, task)) for task, s in sources.items()}   # the fold's own texts
    model = build_model(config, sources)
    if model.inputs.text == "caption":   # never texts that carry the test fold's labels, unless told
        sources = {task: s.check_texts(config.allow_leaky_text) for task, s in sources.items()}
    tasks = [task for task in model.tasks if task in sources]
    unused = [task for task in sources if task not in model.tasks]
    if unused or not tasks:
        raise ConfigError(f"model '{config.model_name}' learns {', '.join(model.tasks)}; datasets were given for "
                          f"{', '.join(sources)}")
    # A task's forward may leave another task's head unused; DDP must then not wait for its gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=len(tasks) > 1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
                              kwargs_handlers=[ddp])
    say = (lambda text: echo(text)) if accelerator.is_main_process else (lambda text: None)

    # ---- data: each process streams its own shard of every task's train split -------------------------------
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = config.batch_size // (world * config.grad_accum)
    if per_process < 1 or per_process * world * config.grad_accum != config.batch_size:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of processes ({world}) x grad_accum "
                          f"({config.grad_accum})")
    train_sets, class_weights = {}, None
    for task in tasks:
        samples = samples_for(sources[task], config, "train", task)
        if not samples or not samples_for(sources[task], config, "test", task):
            raise ConfigError(f"dataset '{sources[task].dataset}' has no {task} "
                              f"{'training' if not samples else 'test'} samples for this split")
        train_sets[task] = make_dataset(model, config, sources[task], samples, train=True, rank=rank,
                                        world_size=world)
        if task == "target" and config.target_labels is not None:
            # Drawn among the samples the store can yield, so a face that failed never takes a label's place.
            usable = set(train_sets[task].usable_ids())
            samples = few_labels([s for s in samples if s["sample_id"] in usable], config.target_labels, config.seed)
            train_sets[task] = make_dataset(model, config, sources[task], samples, train=True, rank=rank,
                                            world_size=world)
        if task == "expression":
            labels = [train_sets[task].labels[sid] for sid in train_sets[task].usable_ids()]
            class_weights = class_weights_from_labels(labels, len(sources[task].label_names))
        if train_sets[task].missing:
            say(f"{task}: {train_sets[task].missing} training samples unusable, e.g. "
                f"{next(iter(train_sets[task].missing_reasons.items()))}")
    loaders = {task: make_loader(data, per_process, config.num_workers) for task, data in train_sets.items()}
    steps_per_epoch = _batches(len(train_sets[tasks[0]]), per_process, config.num_workers)
    if steps_per_epoch == 0:
        raise ConfigError(f"too few training samples for {world} process(es)")
    updates_per_epoch = math.ceil(steps_per_epoch / config.grad_accum)

    # ---- optimisation -----------------------------------------------------------------------------------------
    optimizer = _optimizer(model, config)
    total = updates_per_epoch * config.epochs
    warmup = min(round(updates_per_epoch * config.warmup_epochs), total)   # a warm-up longer than the run ends it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: an AcceleratedScheduler would step once per process; registered so it is checkpointed.
    accelerator.register_for_checkpointing(scheduler)
    if class_weights is not None:
        class_weights = class_weights.to(accelerator.device)

    # ---- the run folder ---------------------------------------------------------------------------------------
    run = _open_run(accelerator, config, sources, runs_dir, resume)
    history: list[dict[str, Any]] = run.read_json("metrics.json") if resume else []
    start = 0
    if resume:
        checkpoint = run.require_checkpoint()
        accelerator.load_state(str(checkpoint))
        start = RunFolder(checkpoint).read_json("trainer_state.json")["epoch"] + 1
        history = history[:start]
        say(f"resuming {run.path} after epoch {start} ({checkpoint.name})")
    say(f"run {run.path}: {config.model_name} on {', '.join(f'{t}={sources[t].dataset}' for t in tasks)}, "
        f"{len(train_sets[tasks[0]]) * world} training samples, {steps_per_epoch} steps per epoch, "
        f"{world} process(es) on {accelerator.device}")

    core = accelerator.unwrap_model(model)
    for epoch in range(start, config.epochs):
        streams = {task: _cycle(loader, train_sets[task], epoch) for task, loader in loaders.items()}
        model.train()
        began, seen, sums, counts = time.perf_counter(), 0, {}, {}
        for step in range(steps_per_epoch):
            window_start = step - step % config.grad_accum
            window = min(config.grad_accum, steps_per_epoch - window_start)
            update = step - window_start == window - 1
            parts = {"loss": 0.0}
            for i, task in enumerate(tasks):
                batch = _to_device(with_domain(next(streams[task]), DOMAINS.get(task)), accelerator.device)
                last = update and i == len(tasks) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    with accelerator.autocast():
                        outputs = model(**core.batch_inputs(batch))
                        losses = core.loss({task: outputs}, {task: batch}, class_weights)
                    accelerator.backward(losses["loss"] / window)
                parts["loss"] = parts["loss"] + losses["loss"].detach()
                if len(tasks) > 1:
                    parts.update({f"{task}/{k}": v.detach() for k, v in losses.items()})
                else:
                    parts.update({k: v.detach() for k, v in losses.items() if k != "loss"})
                seen += len(batch["sample_ids"])
            if update:
                if config.clip_grad is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
        elapsed = time.perf_counter() - began
        entry = {"epoch": epoch, "lr": scheduler.get_last_lr()[-1], "seconds": round(elapsed, 3),
                 "samples_per_s": float(f"{seen * world / elapsed:.4g}"), **_mean_parts(accelerator, sums, counts)}

        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            # Evaluating draws DataLoader seeds from the global generator: fork it, so how often a run evaluates
            # does not change its training.
            with torch.random.fork_rng(devices=[]):
                samples, missing = evaluate(model, config, sources, accelerator, config.eval_views)
            if accelerator.is_main_process:
                results = score(samples, sources, missing)
                write_results(run, samples, results, sources)
                entry["test"] = {k: results[k] for k in tasks if k in results}
                entry["summary"] = summary_line(results)
        history.append(entry)
        say(f"epoch {epoch + 1}/{config.epochs}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
            f"{entry['samples_per_s']:.1f} samples/s" + (f"  test {entry['summary']}" if "summary" in entry else ""))
        _save_checkpoint(accelerator, run, epoch, history)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
            say(f"stopped after epoch {epoch + 1}; continue with --resume {run.path}")
            break
    accelerator.wait_for_everyone()
    return run.path


def train_folds(config: TrainConfig, sources: dict[str, Sources], folds: list[int], runs_dir: Path = Path("runs"),
                *, echo: Callable[[str], None] = print) -> Path:
    """The official protocol of a fold-based dataset (DFEW's 5 folds, IEMOCAP's leave-one-session-out): one run per
    fold, then `<model>-<dataset>-folds-<time>.json` beside them with every fold's scores and their mean and
    standard deviation. Returns that file."""
    # The same flags as train()'s Accelerator: the process-wide state is fixed by whichever comes first.
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    echo = echo if main else (lambda text: None)
    runs, scores = {}, {}
    for fold in folds:
        echo(f"---- fold {fold} ({folds.index(fold) + 1} of {len(folds)})")
        path = train(dataclasses.replace(config, fold=fold), sources, runs_dir, echo=echo)
        runs[fold], scores[fold] = str(path), RunFolder(path).read_json("results.json")
    summary: dict[str, Any] = {"model": config.model_name, "folds": folds, "runs": runs, "results": scores}
    for task in ("expression", "target"):
        if all(task in s for s in scores.values()):
            summary[task] = {metric: _mean_std([s[task][metric] for s in scores.values()]) for metric in ("uar", "war")}
    if all("au" in s for s in scores.values()):
        summary["au"] = {"mean_f1": _mean_std([s["au"]["mean_f1"] or 0.0 for s in scores.values()])}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(runs_dir) / f"{config.model_name}-{next(iter(sources.values())).dataset}-folds-{stamp}.json"
    if main:
        RunFolder(out.parent).write_json(out.name, summary)
    for task in ("expression", "target"):
        if task in summary:
            s = summary[task]
            echo(f"{task} over {len(folds)} folds: UAR {100 * s['uar']['mean']:.2f} ± {100 * s['uar']['std']:.2f}  "
                 f"WAR {100 * s['war']['mean']:.2f} ± {100 * s['war']['std']:.2f}")
    return out


def _mean_parts(accelerator: Accelerator, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """Each loss part's mean over the steps that returned it, over every process. Processes may have seen
    different parts (a batch without AU labels has no AU term), so all reduce the union of the names in one order."""
    names = sorted({name for names in gather_object([sorted(sums)]) for name in names})
    totals = torch.tensor([[sums.get(n, 0.0), counts.get(n, 0)] for n in names], dtype=torch.float64,
                          device=accelerator.device)
    totals = accelerator.reduce(totals, "sum")
    return {n: (s / c if c else float("nan")) for n, (s, c) in zip(names, totals.tolist())}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}


def _open_run(accelerator: Accelerator, config: TrainConfig, sources: dict[str, Sources], runs_dir: Path,
              resume: Path | None) -> RunFolder:
    """The run folder: the resumed one, or a new one named by the main process and shared with the others."""
    if resume is not None:
        return RunFolder(resume)
    name = None
    if accelerator.is_main_process:
        fold = (f"-fold{config.fold}" if config.fold is not None else "") + (
            f"-aufold{config.au_fold}" if config.au_fold is not None else "")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(runs_dir) / f"{config.model_name}-{next(iter(sources.values())).dataset}{fold}-{stamp}"
        path = next(p for p in (base if i == 0 else base.with_name(f"{base.name}-{i}") for i in count())
                    if not p.exists())
        path.mkdir(parents=True)
        run = RunFolder(path)
        run.write_json("config.json", {"train": config.to_dict(), "tasks": list(sources),
                                       "label_names": {t: s.label_names for t, s in sources.items()}})
        run.write_json("stores.json", {task: s.to_json() for task, s in sources.items()})
        run.write_json("git.json", git_state())
        run.write_json("metrics.json", [])
        name = str(path)
    return RunFolder(Path(broadcast_object_list([name])[0]))


def _save_checkpoint(accelerator: Accelerator, run: RunFolder, epoch: int, history: list[dict]) -> None:
    target = run.checkpoints / f"epoch-{epoch + 1:03d}"
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.write_json("metrics.json", history)
        run.finish_checkpoint(target, epoch)
        for old in run.finished_checkpoints()[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if hasattr(model, "param_groups"):
        accepts = inspect.signature(model.param_groups).parameters
        extra = {"layer_decay": config.layer_decay} if "layer_decay" in accepts else {}
        groups = model.param_groups(config.lr, config.weight_decay, **extra)
    else:
        groups = parameter_groups(model.named_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _batches(items: int, batch_size: int, workers: int) -> int:
    """Batches a process's DataLoader yields for `items` samples split over `workers` (each batches its own)."""
    shares = [items * (w + 1) // max(workers, 1) - items * w // max(workers, 1) for w in range(max(workers, 1))]
    return sum(math.ceil(share / batch_size) for share in shares)


def _cycle(loader, data, epoch: int):
    """A task's batches for one epoch, restarting with a new shuffle if they run out before the epoch's steps do
    (a second task's smaller dataset; or a clip that failed to decode, which would leave this process one batch
    short while the others wait for it)."""
    for repeat in count():
        data.set_epoch(epoch + (repeat << 20))
        yield from loader


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
