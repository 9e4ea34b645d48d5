"""Evaluation, used at the end of each training epoch and by `affectprep eval RUN [--views N]`.

Every process predicts its own disjoint shard of the test samples (one item per sample and view), the records
are gathered with accelerate's `gather_object` (unpadded, so no sample is counted twice), the views of a sample
are averaged (mean of the per-view softmax, or of the per-view AU sigmoid), and the main process scores and writes
the results: UAR, WAR, per-class recall and the confusion matrix (PNG and text) for expressions, with the
Davies-Bouldin and Calinski-Harabasz scores of the test embeddings for models that output one; per-AU F1 at 0.5
and with per-AU thresholds searched on the test set (what SSM's public code reports; a searched threshold is
optimistic, hence both) for AUs.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from affectprep.config import ConfigError

from . import metrics
from .data import DOMAINS, Split, select_samples, with_domain
from .runs import RunFolder, Sources, TrainConfig, folds_of, make_dataset, make_loader, samples_for, to_device


def predict(model: nn.Module, loader, accelerator: Accelerator, domain: int | None = None) -> list[dict[str, Any]]:
    """One record per (sample, view) of this process's shard, gathered from every process."""
    core = accelerator.unwrap_model(model)
    model.eval()
    records = []
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            batch = with_domain(batch, domain)
            # The bare module: ranks may run different numbers of test batches, and DDP's forward may sync buffers.
            batch = to_device(batch, accelerator.device)   # the registry's device rule: models never move batches
            outputs = core(**core.batch_inputs(batch))
            probabilities = outputs["logits"].float().softmax(-1).cpu() if "logits" in outputs else None
            au_scores = outputs["au_logits"].float().sigmoid().cpu() if "au_logits" in outputs else None
            embeddings = outputs["embedding"].float().cpu() if "embedding" in outputs else None
            for i, sample_id in enumerate(batch["sample_ids"]):
                record = {"sample_id": sample_id, "view": int(batch["views"][i]), "label": int(batch["labels"][i])}
                if probabilities is not None:
                    record["probabilities"] = probabilities[i].tolist()
                if au_scores is not None and "au" in batch:
                    record["au_scores"], record["au"] = au_scores[i].tolist(), batch["au"][i].tolist()
                if embeddings is not None:
                    record["embedding"] = embeddings[i].tolist()
                records.append(record)
    return gather_object(records)


def per_sample(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average each sample's views; sorted by sample_id. Raises if a (sample, view) came back twice."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        grouped[record["sample_id"]].append(record)
    out = []
    for sample_id in sorted(grouped):
        views = grouped[sample_id]
        if len({r["view"] for r in views}) != len(views):
            raise RuntimeError(f"sample {sample_id} view was predicted twice: the test shards overlap")
        merged = {"sample_id": sample_id, "label": views[0]["label"], "views": len(views)}
        for key in ("probabilities", "au_scores", "embedding"):
            if key in views[0]:
                merged[key] = np.mean([r[key] for r in views], axis=0).tolist()
        if "au" in views[0]:
            merged["au"] = views[0]["au"]
        if "probabilities" in merged:
            merged["prediction"] = int(np.argmax(merged["probabilities"]))
        out.append(merged)
    return out


def score(samples: dict[str, list[dict[str, Any]]], sources: dict[str, Sources],
          missing: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Scores per task: expression reports for "expression" and "target", AU F1 for "au". Test samples that could
    not be scored (no face, no text) are counted under "missing", so a reported score says what it covers."""
    results: dict[str, Any] = {"num_samples": sum(map(len, samples.values()))}
    absent = {task: reasons for task, reasons in missing.items() if reasons}
    if absent:
        results["missing"] = absent
    for task, task_samples in samples.items():
        if task == "au":
            with_aus = [s for s in task_samples if "au_scores" in s]
            if not with_aus:
                continue
            true, scores = [s["au"] for s in with_aus], [s["au_scores"] for s in with_aus]
            au_names = sources[task].au_names
            results["au"] = metrics.au_report(true, scores, au_names)
            results["au_searched_thresholds"] = metrics.au_report(true, scores, au_names,
                                                                  metrics.search_thresholds(true, scores))
        else:
            labelled = [s for s in task_samples if "probabilities" in s and s["label"] >= 0]
            if not labelled:   # every test sample unscorable: "missing" says why
                continue
            labels = [s["label"] for s in labelled]
            results[task] = metrics.expression_report(labels, [s["prediction"] for s in labelled],
                                                      sources[task].label_names)
            # How well the model's embedding space separates the classes (GReFEL's Fig. 5).
            if labelled and "embedding" in labelled[0] and 2 <= len(set(labels)) < len(labels):
                results[task]["clusters"] = metrics.cluster_scores([s["embedding"] for s in labelled], labels)
    return results


def write_results(run: RunFolder, samples: dict[str, list[dict[str, Any]]], results: dict[str, Any],
                  sources: dict[str, Sources], name: str = "results") -> None:
    """results JSON, test predictions (Parquet, with their task; embeddings too when the model gives them) and, per
    expression task, the confusion matrix as PNG and text (`<name>-confusion.*` for "expression",
    `<name>-<task>-confusion.*` for another)."""
    run.write_json(f"{name}.json", results)
    rows = [{"task": task, **s} for task, task_samples in samples.items() for s in task_samples]
    columns = {key: [r.get(key) for r in rows] for key in ("task", "sample_id", "label", "prediction", "views",
                                                           "probabilities", "au_scores", "au", "embedding")
               if any(key in r for r in rows)}
    pq.write_table(pa.table(columns), run.path / f"{name}-predictions.parquet")
    for task in samples:
        if task in results and "confusion" in results[task]:
            stem = f"{name}-confusion" if task == "expression" else f"{name}-{task}-confusion"
            cm, names = np.asarray(results[task]["confusion"]), sources[task].label_names
            metrics.save_confusion_png(cm, names, run.path / f"{stem}.png", title=f"{name}: {task}")
            (run.path / f"{stem}.txt").write_text(metrics.confusion_table(cm, names) + "\n")


def summary_line(results: dict[str, Any]) -> str:
    skipped = sum(map(len, results.get("missing", {}).values()))
    parts = [f"{results['num_samples']} samples" + (f" ({skipped} unscorable, see results.json)" if skipped else "")]
    for task in ("expression", "target"):
        if task in results:
            e = results[task]
            parts.append(("target " if task == "target" else "") + f"UAR {100 * e['uar']:.2f}  WAR {100 * e['war']:.2f}")
    if "au" in results:
        parts.append(f"AU F1 {100 * (results['au']['mean_f1'] or 0):.2f} "
                     f"(searched thresholds {100 * (results['au_searched_thresholds']['mean_f1'] or 0):.2f})")
    return "  ".join(parts)


def evaluate(model: nn.Module, config: TrainConfig, sources: dict[str, Sources], accelerator: Accelerator,
             views: int | None, part: str = "test", samples_of: dict[str, list[dict]] | None = None
             ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, str]]]:
    """Predict `part` ("test" or "validation") of every task (or the index rows in `samples_of[task]`) with up to
    `views` views per sample: per task, per-sample records (every process gets them), and the samples that could
    not be scored, with why. `config` is resolved. A task without samples is left out."""
    core = accelerator.unwrap_model(model)
    out, missing = {}, {}
    for task, task_sources in sources.items():
        per_process = max(1, config.batch_for(task) // (accelerator.num_processes * config.grad_accum))
        samples = samples_of[task] if samples_of is not None else samples_for(task_sources, config, part, task)
        if not samples:
            continue
        dataset = make_dataset(core, config, task_sources, samples, train=False, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, view=None, max_views=views)
        loader = make_loader(dataset, per_process, config.num_workers)
        out[task] = per_sample(predict(model, loader, accelerator, domain=DOMAINS.get(task)))
        missing[task] = dict(sorted(dataset.missing_reasons.items()))
    return out, missing


def evaluate_run(run_path: Path, views: int | None = None) -> dict[str, Any]:
    """`affectprep eval RUN`: the run's reported model (its selected epoch's weights) on the run's test data,
    written as eval-views<N>.*"""
    run = RunFolder(run_path)
    config, sources = run.config(), run.sources()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    model = accelerator.prepare(run.trained_model())
    views = views if views is not None else config.eval_views
    samples, missing = evaluate(model, config, sources, accelerator, views)
    results = score(samples, sources, missing)
    results["views"] = views or "all"
    if accelerator.is_main_process:
        write_results(run, samples, results, sources, f"eval-views{views or 'all'}")
    return results


# ---- cross-dataset evaluation (SSM Table X) -----------------------------------------------------------------------

def shared_labels(trained: Sources, other: Sources, task: str) -> list[str]:
    """The classes (AUs for "au") of `other` that the run's model also predicts, in `other`'s order; a one-line
    error when there are none."""
    mine, theirs = ((trained.au_names, other.au_names) if task == "au" else (trained.label_names, other.label_names))
    shared = [name for name in theirs if name in mine]
    if not shared:
        what = "AUs" if task == "au" else "classes"
        raise ConfigError(f"dataset '{other.dataset}' shares no {what} with the run's '{trained.dataset}' "
                          f"({', '.join(theirs)} against {', '.join(mine)}): nothing to score")
    return shared


def cross_samples(other: Sources, task: str, fold: int | None) -> list[dict]:
    """The samples of another dataset a cross-dataset test scores: its test part (fold `fold`'s, or the fixed
    split's); a dataset with folds only and no fold given: every sample of its folds (the model saw none)."""
    index = other.store("index")
    try:
        return select_samples(index, Split(fold), "test", task)
    except ValueError as e:
        if fold is not None or "no fixed split" not in str(e):
            raise ConfigError(f"dataset '{other.dataset}': {e}") from None
    return sorted((s for k in folds_of(other) for s in select_samples(index, Split(k), "test", task)),
                  key=lambda s: s["sample_id"])


def restrict(records: list[dict[str, Any]], trained: Sources, other: Sources, task: str,
             shared: list[str]) -> list[dict[str, Any]]:
    """Per-sample records of the trained model on `other` read on the shared labels (Table X: "we index the output
    distribution of BP4D to match the shared labels in DISFA"): AU scores and labels of the shared AUs; class
    probabilities of the shared classes renormalised (our choice, the same indexing for expressions: the
    prediction is among the classes the test set has), labels renumbered, samples of other classes dropped."""
    out = []
    for record in records:
        record = dict(record)
        if task == "au":
            if "au_scores" in record:
                record["au_scores"] = [record["au_scores"][trained.au_names.index(n)] for n in shared]
                record["au"] = [record["au"][other.au_names.index(n)] for n in shared]
        else:
            name = other.label_names[record["label"]] if record["label"] >= 0 else None
            if name not in shared:
                continue
            record["label"] = shared.index(name)
            if "probabilities" in record:
                p = np.asarray([record["probabilities"][trained.label_names.index(n)] for n in shared])
                record["probabilities"] = (p / max(p.sum(), 1e-12)).tolist()
                record["prediction"] = int(np.argmax(p))
        out.append(record)
    return out


def evaluate_on(run_path: Path, others: dict[str, Sources], views: int | None = None,
                fold: int | None = None) -> dict[str, Any]:
    """`affectprep eval RUN --dataset OTHER`: the run's last checkpoint on other datasets of the project, each as
    the task its labels name (an AU dataset "au", else "expression"), scored on the labels it shares with the
    run's own (SSM Table X: trained on BP4D + DFEW, tested on DISFA's 5 shared AUs and FERV39k's 7 classes).
    Written as eval-<datasets>-views<N>.*"""
    run = RunFolder(run_path)
    config, trained = run.config(), run.sources()
    for task, other in others.items():
        if task not in trained:
            raise ConfigError(f"dataset '{other.dataset}' is an {task} dataset; the run learnt "
                              f"{', '.join(trained)} only")
    shared = {task: shared_labels(trained[task], other, task) for task, other in others.items()}
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    model = accelerator.prepare(run.trained_model())
    core = accelerator.unwrap_model(model)
    others = {task: other.for_fold(fold) for task, other in others.items()}
    if core.inputs.text == "caption":   # never texts that carry the test labels of what is scored
        others = {task: other.check_texts(False) for task, other in others.items()}
    samples_of = {task: cross_samples(other, task, fold) for task, other in others.items()}
    views = views if views is not None else config.eval_views
    samples, missing = evaluate(model, config, others, accelerator, views, samples_of=samples_of)
    samples = {task: restrict(records, trained[task], others[task], task, shared[task])
               for task, records in samples.items()}
    scored = {task: dataclasses.replace(other, label_names=shared[task] if task != "au" else other.label_names,
                                        au_names=shared[task] if task == "au" else other.au_names)
              for task, other in others.items()}
    results = score(samples, scored, missing)
    results["views"] = views or "all"
    results["datasets"] = {task: {"dataset": other.dataset, "fold": fold, "shared": shared[task],
                                  "trained_on": trained[task].dataset} for task, other in others.items()}
    if accelerator.is_main_process:
        name = "-".join(other.dataset for other in others.values())
        write_results(run, samples, results, scored, f"eval-{name}-views{views or 'all'}")
        results["written"] = f"eval-{name}-views{views or 'all'}.json"
    return results
