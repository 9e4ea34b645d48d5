"""`affectprep explain RUN SAMPLE`: run a trained model on one sample and let the model draw what it matched
(GRACE: the transport plan between caption phrases and frames; SSM: its AU <-> expression matrices)."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from affectprep import schema as S
from affectprep.config import ConfigError

from .data import collate
from .runs import RunFolder, make_dataset, to_device


def explain_sample(run_path: Path, sample_id: str, out_dir: Path) -> list[Path]:
    run = RunFolder(run_path)
    config, sources = run.config(), run.sources()
    model = run.trained_model().eval()
    if not hasattr(model, "explain"):
        raise ConfigError(f"model '{config.model_name}' has no explanation to draw")
    for task, task_sources in sources.items():
        rows = task_sources.store("index").read(ids=[sample_id], status=S.STATUS_OK).to_pylist()
        if rows:
            break
    else:
        raise ConfigError(f"no sample '{sample_id}' in the run's datasets "
                          f"({', '.join(s.dataset for s in sources.values())})")
    dataset = make_dataset(model, config, task_sources, rows, train=False, view=0)
    items = list(dataset)
    if not items:
        reason = dataset.missing_reasons.get(sample_id, "it could not be read")
        raise ConfigError(f"cannot explain {sample_id}: it {reason}")
    batch = to_device(collate(items), next(model.parameters()).device)   # the registry's device rule
    with torch.no_grad():
        outputs = model(**model.batch_inputs(batch))
    out_dir.mkdir(parents=True, exist_ok=True)
    offered = {"batch": batch, "outputs": outputs, "out_dir": out_dir, "label_names": task_sources.label_names}
    wanted = inspect.signature(model.explain).parameters
    try:
        return model.explain(**{k: v for k, v in offered.items() if k in wanted})
    except ValueError as e:   # this run has nothing of that kind to draw (e.g. GRACE trained on cached text)
        raise ConfigError(f"cannot explain {sample_id}: {e}") from None
