"""The training recipe: one explicit accelerate loop that trains any registered model from the cached stores, with
the model's paper recipe (models/recipes.py) unless told otherwise.

    affectprep train grace --dataset dfew --fold 1                      # one CPU or GPU
    accelerate launch --multi_gpu -m affectprep train grace ...          # several processes (GPUs; on a machine
                                                                         # without GPUs, CPU processes with gloo)

`train` reads as its steps: resolve the recipe, set up the model, the data, the optimiser and the run folder, then
per epoch: the model's `begin_epoch` hook, one training epoch, evaluation on validation and test, selection, a
checkpoint.

Per step, each task the model learns draws one batch of its own size (SSM: 12 expression clips and 128 AU frames,
the recipe's batch_size per task); each task's batch is forwarded and back-propagated in turn, under `no_sync`
except the last, so DDP reduces gradients once per step and the two forwards never overlap in one graph (the
model's loss is a sum over tasks, so this equals the joint loss). Under N processes each draws batch / N of each
task. `grad_accum` micro-steps make one optimiser step; the last window of an epoch may be shorter and is averaged
over its own length. Gradients are clipped to `clip_grad` (0: not); mixed precision comes from accelerate.

Learning rate (torch.optim.lr_scheduler): cosine = linear warm-up then cosine to the floor min_lr, per optimiser
step (LambdaLR, each group's floor keeping its ratio to its peak, as MAE-DFER's scheduler scales every group);
step = x gamma every step_size epochs (StepLR); exponential = x gamma every epoch (ExponentialLR); a warm-up before
these two is whole epochs (LinearLR, SequentialLR). metrics.json records per epoch each parameter group's lr as its
last optimiser step used it ("lrs", before any layer-wise scale; "lr" is the first group's).

Selection (models/splits.py): every evaluated epoch scores validation and test; results.json holds the test scores
of the epoch with the best validation score by the recipe's selection_metric (or of the last, selection = last),
"selection" saying how it was chosen, and "last_epoch" the last evaluated epoch's test scores; selected-model.pt
its weights.

Checkpoints: after every epoch (after its evaluation) the full accelerate state - model, optimizer, scheduler,
every process's RNG - is saved to checkpoints/epoch-NNN; trainer_state.json inside marks it complete. The data
order and augmentation of an epoch depend only on (seed, epoch), so `--resume RUN` continues exactly where an
uninterrupted run would be: same batches, same random draws, same weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from torch import nn

from affectprep.config import ConfigError

from .data import DOMAINS, StoreSamples, class_weights_from_labels, few_labels, with_domain
from .evaluate import evaluate, score, summary_line, write_results
from .layers.optim import parameter_groups
from .registry import model_needs
from .runs import (SELECTED_WEIGHTS, RunFolder, Sources, TrainConfig, build_model, git_state, make_dataset,
                   make_loader, samples_for, selection_tasks, task_fold, to_device)

CHECKPOINTS_KEPT = 1
PARTS = ("train", "validation", "test")


def train(config: TrainConfig, sources: dict[str, Sources], runs_dir: Path = Path("runs"), *,
          resume: Path | None = None, stop_after_epoch: int | None = None,
          echo: Callable[[str], None] = print) -> Path:
    """Train (or, with `resume`, continue) a run; returns its folder. `sources` maps each task to its stores.

    stop_after_epoch: end this process after that epoch's checkpoint (e.g. to fit a cluster's time limit);
    `--resume` goes on from there.
    """
    config = config.resolved()
    set_seed(config.seed)
    model, sources, tasks = _setup_model(config, sources)
    # A task's forward may leave another task's head unused; DDP must then not wait for its gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=len(tasks) > 1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
                              kwargs_handlers=[ddp])
    say = (lambda text: echo(text)) if accelerator.is_main_process else (lambda text: None)
    data = _setup_data(model, config, sources, tasks, accelerator, say)
    optimizer, scheduler = _setup_optimizer(model, config, data.updates_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: an AcceleratedScheduler would step once per process; registered so it is checkpointed.
    accelerator.register_for_checkpointing(scheduler)
    run = _open_run(accelerator, config, sources, runs_dir, resume, data.splits)
    history: list[dict[str, Any]] = run.read_json("metrics.json") if resume else []
    start = 0
    if resume:
        checkpoint = run.require_checkpoint()
        accelerator.load_state(str(checkpoint))
        start = RunFolder(checkpoint).read_json("trainer_state.json")["epoch"] + 1
        history = history[:start]
        say(f"resuming {run.path} after epoch {start} ({checkpoint.name})")
    say(f"run {run.path}: {config.model_name} on {', '.join(f'{t}={sources[t].dataset}' for t in tasks)}, "
        f"{len(data.train_sets[tasks[0]]) * accelerator.num_processes} training samples, {data.steps_per_epoch} "
        f"steps per epoch, {accelerator.num_processes} process(es) on {accelerator.device}")

    selection = Selection.from_history(config, tasks, history, run if resume else None)
    core = accelerator.unwrap_model(model)
    for epoch in range(start, config.epochs):
        if hasattr(core, "begin_epoch"):
            core.begin_epoch(epoch, EpochData(core, config, sources, data, accelerator))
        entry = _train_epoch(model, optimizer, scheduler, data, config, accelerator, epoch)
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            entry.update(_evaluate_epoch(model, config, sources, accelerator, run, selection, epoch))
        history.append(entry)
        say(f"epoch {epoch + 1}/{config.epochs}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
            f"{entry['samples_per_s']:.1f} samples/s" + (f"  test {entry['summary']}" if "summary" in entry else "")
            + (f"  validation {entry['validation_score']:.4f}" if entry.get("validation_score") is not None
               else ""))
        _save_checkpoint(accelerator, run, epoch, history)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
            say(f"stopped after epoch {epoch + 1}; continue with --resume {run.path}")
            break
    accelerator.wait_for_everyone()
    return run.path


# ---- step 1: the model and the tasks it learns --------------------------------------------------------------

def _setup_model(config: TrainConfig, sources: dict[str, Sources]) -> tuple[nn.Module, dict[str, Sources], list[str]]:
    sources = {task: s.for_fold(task_fold(config, task)) for task, s in sources.items()}   # the fold's own texts
    model = build_model(config, sources)
    if model.inputs.text == "caption":   # never texts that carry the test fold's labels, unless told
        sources = {task: s.check_texts(config.allow_leaky_text) for task, s in sources.items()}
    tasks = [task for task in model.tasks if task in sources]
    unused = [task for task in sources if task not in model.tasks]
    if unused or not tasks:
        raise ConfigError(f"model '{config.model_name}' learns {', '.join(model.tasks)}; datasets were given for "
                          f"{', '.join(sources)}")
    return model, sources, tasks


# ---- step 2: the data ---------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """Every task's training stream of this process, and what the run's parts hold."""
    tasks: list[str]
    train_sets: dict[str, StoreSamples]
    loaders: dict[str, Any]
    per_process: dict[str, int]              # batch size of each task per process and micro-step
    steps_per_epoch: int
    updates_per_epoch: int
    class_weights: torch.Tensor | None
    samples: dict[str, list[dict]]           # the training samples of each task (few-labelled for "target")
    splits: dict[str, dict[str, list[str]]] = field(default_factory=dict)   # task -> part -> sample ids


def _setup_data(model: nn.Module, config: TrainConfig, sources: dict[str, Sources], tasks: list[str],
                accelerator: Accelerator, say: Callable[[str], None]) -> TrainData:
    """Each process streams its own shard of every task's training part, in batches of the task's size."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = {}
    for task in tasks:
        size = config.batch_for(task)
        per_process[task] = size // (world * config.grad_accum)
        if per_process[task] < 1 or per_process[task] * world * config.grad_accum != size:
            raise ConfigError(f"batch_size of {task} ({size}) must be a multiple of processes ({world}) x "
                              f"grad_accum ({config.grad_accum})")
    train_sets, chosen, splits, class_weights = {}, {}, {}, None
    for task in tasks:
        parts = {part: samples_for(sources[task], config, part, task) for part in PARTS}
        splits[task] = {part: [s["sample_id"] for s in rows] for part, rows in parts.items()}
        samples = parts["train"]
        if not samples or not parts["test"]:
            raise ConfigError(f"dataset '{sources[task].dataset}' has no {task} "
                              f"{'training' if not samples else 'test'} samples for this split")
        dataset = make_dataset(model, config, sources[task], samples, train=True, rank=rank, world_size=world)
        _require_usable(dataset, sources[task], task, len(samples))
        if task == "target" and config.target_labels is not None:
            # Drawn among the samples the store can yield, so a face that failed never takes a label's place.
            usable = set(dataset.usable_ids())
            samples = few_labels([s for s in samples if s["sample_id"] in usable], config.target_labels, config.seed)
            dataset = make_dataset(model, config, sources[task], samples, train=True, rank=rank, world_size=world)
        if task == "expression" and config.class_weighting == "inverse_sqrt":
            labels = [dataset.labels[sid] for sid in dataset.usable_ids()]
            class_weights = class_weights_from_labels(labels, len(sources[task].label_names)).to(accelerator.device)
        if dataset.missing:
            say(f"{task}: {dataset.missing} training samples unusable, e.g. "
                f"{next(iter(dataset.missing_reasons.items()))}")
        train_sets[task], chosen[task] = dataset, samples
    if config.selection == "best_val" and not any(splits[t]["validation"] for t in tasks
                                                       if t in selection_tasks(config)):
        raise ConfigError(f"no validation samples to select the epoch on (val_fraction {config.val_fraction}): "
                          f"raise val_fraction, or set selection = \"last\"")
    loaders = {task: make_loader(data, per_process[task], config.num_workers) for task, data in train_sets.items()}
    steps = _batches(len(train_sets[tasks[0]]), per_process[tasks[0]], config.num_workers)
    if steps == 0:
        raise ConfigError(f"too few training samples for {world} process(es)")
    return TrainData(tasks, train_sets, loaders, per_process, steps, math.ceil(steps / config.grad_accum),
                     class_weights, chosen, splits)


def _require_usable(dataset: StoreSamples, sources: Sources, task: str, total: int) -> None:
    """One line, not a traceback deep in the loss, when no training sample can be read (e.g. a text version
    with no text for any of them)."""
    if dataset.usable_ids():
        return
    texts = sources.stores.get("texts")
    version = f" with text version {texts.key} ({texts.stage})" if texts is not None else ""
    reason = next(iter(dataset.missing_reasons.values()), "none is in the store")
    raise ConfigError(f"dataset '{sources.dataset}': none of its {total} {task} training samples is usable"
                      f"{version}, e.g. one {reason}: run `affectprep run` for the stages that make them (see "
                      f"`affectprep status`), or pick another version with --text-version (see `affectprep text "
                      f"list`)")


# ---- step 3: the optimiser and its schedule -----------------------------------------------------------------

def _setup_optimizer(model: nn.Module, config: TrainConfig, updates_per_epoch: int
                     ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    groups = _param_groups(model, config)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum or 0.0)
    else:
        kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        optimizer = kind(groups, lr=config.lr, betas=tuple(config.betas or (0.9, 0.999)), eps=config.eps or 1e-8)
    return optimizer, _scheduler(optimizer, config, updates_per_epoch)


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The model's named groups with the recipe's lr and weight decay per name (layer decay where the model
    declares it)."""
    weight_decay = config.group_weight_decay()
    declared = model_needs(config.model_name)
    if config.layer_decay not in (None, 1.0) and "layer_decay" not in declared:
        raise ConfigError(f"model '{config.model_name}' has no layer-wise lr decay; drop layer_decay")
    try:
        if hasattr(model, "param_groups"):
            extra = {"layer_decay": config.layer_decay or 1.0} if "layer_decay" in declared else {}
            return model.param_groups(dict(config.group_lr), weight_decay, **extra)
        return parameter_groups(model.named_parameters(), lr=dict(config.group_lr), weight_decay=weight_decay)
    except ValueError as e:   # a group the recipe does not name
        raise ConfigError(f"model '{config.model_name}': {e}") from None


def per_epoch_schedule(config: TrainConfig) -> bool:
    """Whether the scheduler steps once per epoch (step, exponential) rather than per optimiser step (cosine)."""
    return config.schedule in ("step", "exponential")


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, updates_per_epoch: int
               ) -> torch.optim.lr_scheduler.LRScheduler:
    lr_scheduler = torch.optim.lr_scheduler
    if config.schedule == "cosine":
        total = updates_per_epoch * config.epochs
        warmup = min(round(updates_per_epoch * config.warmup_epochs), total)   # a warm-up longer than the run ends it
        floor = config.min_lr / config.lr
        return lr_scheduler.LambdaLR(optimizer, lambda step: _cosine_factor(step, warmup, total, floor))
    decay = (lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
             if config.schedule == "step" else lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma))
    warmup = round(config.warmup_epochs)
    if warmup < 1:
        return decay
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


def _cosine_factor(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of each named group, before a parameter's own scale (layer-wise decay)."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        out.setdefault(group.get("name", "all"), group["lr"] / group.get("lr_scale", 1.0))
    return out


# ---- step 4: the hook before an epoch -------------------------------------------------------------------------

class EpochData:
    """What `begin_epoch(epoch, data)` gets (registry contract): `batches(task)` yields this process's share of the
    task's labelled training samples, unaugmented, collated and on the model's device; `gather(tensor)`
    concatenates a tensor over every process (each calls it, in the same order)."""

    def __init__(self, model: nn.Module, config: TrainConfig, sources: dict[str, Sources], data: TrainData,
                 accelerator: Accelerator):
        self.model, self.config, self.sources, self.data, self.accelerator = model, config, sources, data, accelerator
        self.tasks = list(data.tasks)

    def batches(self, task: str) -> Iterator[dict[str, Any]]:
        if task not in self.tasks:
            return
        labelled = [s for s in self.data.samples[task] if s.get("label") is not None and s["label"] >= 0]
        dataset = make_dataset(self.model, self.config, self.sources[task], labelled, train=False,
                               rank=self.accelerator.process_index, world_size=self.accelerator.num_processes)
        for batch in make_loader(dataset, self.data.per_process[task], self.config.num_workers):
            yield to_device(with_domain(batch, DOMAINS.get(task)), self.accelerator.device)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        parts = gather_object([tensor.detach().cpu()])
        return torch.cat(parts).to(tensor.device)


# ---- step 5: one training epoch -------------------------------------------------------------------------------

def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data: TrainData,
                 config: TrainConfig, accelerator: Accelerator, epoch: int) -> dict[str, Any]:
    """One epoch of optimiser steps, each drawing one batch of every task; returns its metrics.json entry."""
    core = accelerator.unwrap_model(model)
    streams = {task: _cycle(loader, data.train_sets[task], epoch) for task, loader in data.loaders.items()}
    model.train()
    began, seen, sums, counts = time.perf_counter(), 0, {}, {}
    lrs = group_lrs(optimizer)
    for step in range(data.steps_per_epoch):
        window_start = step - step % config.grad_accum
        window = min(config.grad_accum, data.steps_per_epoch - window_start)
        update = step - window_start == window - 1
        parts = {"loss": 0.0}
        for i, task in enumerate(data.tasks):
            batch = to_device(with_domain(next(streams[task]), DOMAINS.get(task)), accelerator.device)
            last = update and i == len(data.tasks) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    outputs = model(**core.batch_inputs(batch))
                    losses = core.loss({task: outputs}, {task: batch}, data.class_weights)
                accelerator.backward(losses["loss"] / window)
            parts["loss"] = parts["loss"] + losses["loss"].detach()
            if len(data.tasks) > 1:
                parts.update({f"{task}/{k}": v.detach() for k, v in losses.items()})
            else:
                parts.update({k: v.detach() for k, v in losses.items() if k != "loss"})
            seen += len(batch["sample_ids"])
        if update:
            if config.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), config.clip_grad)
            lrs = group_lrs(optimizer)
            optimizer.step()
            if not per_epoch_schedule(config):
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    if per_epoch_schedule(config):
        scheduler.step()
    elapsed = time.perf_counter() - began
    return {"epoch": epoch, "lr": next(iter(lrs.values())), "lrs": lrs, "seconds": round(elapsed, 3),
            "samples_per_s": float(f"{seen * accelerator.num_processes / elapsed:.4g}"),
            **_mean_parts(accelerator, sums, counts)}


# ---- step 6: evaluation and selection -------------------------------------------------------------------------

@dataclass
class Selection:
    """The epoch results.json reports: the best validation score so far (selection = best_val) or the last."""
    rule: str
    metrics: dict[str, str]
    best: float | None = None
    epoch: int | None = None
    results: dict[str, Any] | None = None     # the selected epoch's test results

    @classmethod
    def from_history(cls, config: TrainConfig, tasks: list[str], history: list[dict], run: RunFolder | None
                     ) -> "Selection":
        """The selection of a run learning `tasks`, carried on from `history` and results.json when resuming."""
        metrics = {task: metric for task, metric in selection_tasks(config).items() if task in tasks}
        selection = cls(config.selection, metrics)
        if run is not None and (run.path / "results.json").exists():
            saved = run.read_json("results.json")
            selection.results = {k: v for k, v in saved.items() if k not in ("selection", "last_epoch")}
            selection.epoch = saved.get("selection", {}).get("epoch")
            scores = [e["validation_score"] for e in history if e.get("validation_score") is not None]
            selection.best = max(scores) if scores else None
        return selection

    def metric_name(self) -> str:
        return ", ".join(f"{task} {metric}" for task, metric in self.metrics.items())

    def score(self, results: dict[str, Any]) -> float | None:
        """The mean over the selected tasks present of their metric, on validation results."""
        values = [(results.get(task) or {}).get(metric) for task, metric in self.metrics.items()
                  if task in results]
        values = [v or 0.0 for v in values]
        return statistics.fmean(values) if values else None

    def consider(self, epoch: int, validation_score: float | None) -> bool:
        """Whether this epoch becomes the selected one: the last always (selection = last); else a better
        validation score than every earlier epoch's (the first evaluated epoch stands until one is better)."""
        if self.rule == "last":
            self.epoch = epoch
            return True
        improved = validation_score is not None and (self.best is None or validation_score > self.best)
        if improved:
            self.best = validation_score
        if improved or self.epoch is None:
            self.epoch = epoch
            return True
        return False


def _evaluate_epoch(model: nn.Module, config: TrainConfig, sources: dict[str, Sources], accelerator: Accelerator,
                    run: RunFolder, selection: Selection, epoch: int) -> dict[str, Any]:
    """Score validation and test; the selected epoch's test results go to results.json (with its predictions and
    weights), beside the last epoch's test scores."""
    # Evaluating draws DataLoader seeds from the global generator: fork it, so how often a run evaluates does not
    # change its training.
    with torch.random.fork_rng(devices=[]):
        validation_sources = {t: s for t, s in sources.items() if t in selection.metrics}
        checked = (evaluate(model, config, validation_sources, accelerator, config.eval_views, part="validation")
                   if selection.rule == "best_val" else ({}, {}))
        samples, missing = evaluate(model, config, sources, accelerator, config.eval_views)
    entry: dict[str, Any] = {}
    validation_score = None
    if checked[0] and any(checked[0].values()):
        validated = score(checked[0], validation_sources, checked[1])
        validation_score = selection.score(validated)
        entry["validation"] = {task: {m: validated[task][m]} for task, m in selection.metrics.items()
                               if task in validated}
        entry["validation_score"] = validation_score
    chosen = selection.consider(epoch, validation_score)
    if accelerator.is_main_process:
        results = score(samples, sources, missing)
        entry["test"] = {k: results[k] for k in sources if k in results}
        entry["summary"] = summary_line(results)
        if chosen:
            write_results(run, samples, results, sources)
            selection.results = results
            torch.save(accelerator.unwrap_model(model).state_dict(), run.path / SELECTED_WEIGHTS)
        report = dict(selection.results or {})
        report["selection"] = {"rule": selection.rule, "metric": selection.metric_name() if selection.rule ==
                               "best_val" else None, "split": "validation" if selection.rule == "best_val" else None,
                               "epoch": selection.epoch, "validation_score": selection.best}
        report["last_epoch"] = {"epoch": epoch, **{k: results[k] for k in (*sources, "au_searched_thresholds",
                                                                           "num_samples") if k in results}}
        run.write_json("results.json", report)
    return entry


def train_folds(config: TrainConfig, sources: dict[str, Sources], folds: list[int], runs_dir: Path = Path("runs"),
                *, echo: Callable[[str], None] = print) -> Path:
    """The official protocol of a fold-based dataset (DFEW's 5 folds, IEMOCAP's leave-one-session-out): one run per
    fold, then `<model>-<dataset>-folds-<time>.json` beside them with every fold's scores (of its
    validation-selected epoch) and their mean and standard deviation. Returns that file."""
    # The same flags as train()'s Accelerator: the process-wide state is fixed by whichever comes first.
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    echo = echo if main else (lambda text: None)
    runs, scores = {}, {}
    for fold in folds:
        echo(f"---- fold {fold} ({folds.index(fold) + 1} of {len(folds)})")
        path = train(dataclasses.replace(config, fold=fold), sources, runs_dir, echo=echo)
        runs[fold], scores[fold] = str(path), RunFolder(path).read_json("results.json")
    # Each fold's results.json holds its selected epoch's test scores: the mean and std are over those.
    summary: dict[str, Any] = {"model": config.model_name, "folds": folds, "runs": runs, "results": scores,
                               "selection": {fold: s.get("selection") for fold, s in scores.items()}}
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
              resume: Path | None, splits: dict[str, dict[str, list[str]]]) -> RunFolder:
    """The run folder: the resumed one, or a new one named by the main process and shared with the others.
    config.json holds the resolved config and recipe (its sources naming what was overridden), splits.json the
    sample ids of each part per task."""
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
        run.write_json("config.json", {"train": config.to_dict(), "recipe": config.recipe_json(),
                                       "tasks": list(sources),
                                       "label_names": {t: s.label_names for t, s in sources.items()}})
        run.write_json("splits.json", splits)
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
