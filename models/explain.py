"""`affectprep explain RUN SAMPLE`: run a trained model on one sample and let the model draw what it matched
(GRACE: the transport plan between caption phrases and frames; SSM: its AU <-> expression matrices).

Every figure follows models/figures.py: `<sample>-<what>.png` beside the `.json` of the numbers drawn."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from affectprep import schema as S
from affectprep.config import ConfigError

from .data import collate
from .runs import RunFolder, make_dataset, to_device


def explain_sample(run_path: Path, sample_id: str | None, out_dir: Path) -> list[Path]:
    """The model's figures for one sample, or, for a model whose explanation does not depend on the input
    (`explains_samples = False`, e.g. SSM's learnt matrices), for the run (`sample_id` may be None; one given is
    not needed and is ignored)."""
    run = RunFolder(run_path)
    config, sources = run.config(), run.sources()
    model = run.trained_model().eval()
    if not hasattr(model, "explain"):
        raise ConfigError(f"model '{config.model_name}' has no explanation to draw")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not explains_samples(model):
        return _explained(model.explain, sample_id or config.model_name, out_dir=out_dir)
    if sample_id is None:
        raise ConfigError(f"name the sample to explain: `affectprep explain {run_path} SAMPLE` "
                          f"(a sample id of {', '.join(s.dataset for s in sources.values())})")
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
    return _explained(model.explain, sample_id, batch=batch, outputs=outputs, out_dir=out_dir,
                      label_names=task_sources.label_names)


def explains_samples(model) -> bool:
    """Whether the model's explanation is of one input (the registry default) or of the trained model itself."""
    return getattr(model, "explains_samples", True)


def _explained(explain, subject: str, **offered) -> list[Path]:
    wanted = inspect.signature(explain).parameters
    try:
        return explain(**{k: v for k, v in offered.items() if k in wanted})
    except ValueError as e:   # this run has nothing of that kind to draw (e.g. GRACE trained on cached text)
        raise ConfigError(f"cannot explain {subject}: {e}") from None
