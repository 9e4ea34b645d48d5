"""The `affectprep` command line. Exit codes: 0 all done, 3 finished with failed samples, 2 usage/config error."""
from __future__ import annotations

import dataclasses
import errno
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from affectprep.config import (DEFAULT_CONFIG_FILE, ConfigError, DatasetConfig, ProjectConfig, load_project,
                               project_from_dict, write_project)
from affectprep.store import SchemaMismatch, StoreLocked

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Prepare emotion-recognition datasets with vision and language models, and train on them.")

EXIT_FAILED_SAMPLES = 3
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130   # as a shell reports a command ended by Ctrl-C

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Project file.")]
CacheOpt = Annotated[Optional[Path], typer.Option(help="Store root (default: the project's cache).")]
DatasetOpt = Annotated[Optional[list[str]], typer.Option("--dataset", "-d", help="Only this dataset (repeatable).")]


@app.command()
def demo(out: Annotated[Path, typer.Option(help="Folder for the demo dataset, project file and cache.")] = Path("demo"),
         clips: Annotated[int, typer.Option(min=7, help="Number of clips (balanced over the 7 classes).")] = 70,
         workers: Annotated[Optional[int], typer.Option(min=1, help="Local Dask workers (default: CPU count).")] = None,
         seed: int = 0) -> None:
    """Generate a demo dataset in DFEW's layout from a real face photo, then run every stage offline."""
    from affectprep.pipeline.backends.face import offline_backend
    from affectprep.pipeline.demo import make_demo_dataset
    from affectprep.pipeline.stages import STAGES

    out.mkdir(parents=True, exist_ok=True)
    root = make_demo_dataset(out / "DFEW", clips=clips, seed=seed)
    typer.echo(f"demo dataset: {clips} clips in {root}")
    project = ProjectConfig(out / DEFAULT_CONFIG_FILE, (out / "cache").resolve(),
                            {"demo": DatasetConfig("demo", "dfew", root.resolve())},
                            _default_stage_options(STAGES))
    # The offline backends: no weights, no network (dlib's 68 landmarks where the dlib extra is installed).
    project.stages["faces"]["backend"] = offline_backend()
    project.stages["captions"]["captioner"] = "motion"
    project.stages["cate"]["llm"] = "template"
    write_project(project)
    typer.echo(f"project file: {project.path}")
    _run_and_exit(project, None, None, workers=workers,
                  status_hint=_status_command(project.path, None, None, None, None, None, None))


DATASET_KINDS = ("dfew", "ferv39k", "mafw", "bp4d", "disfa", "iemocap", "csv", "rafdb", "affectnet", "ferplus",
                 "oulu", "nvie")   # the registered adapters (a test keeps this in step with them)


@app.command()
def init(kind: Annotated[str, typer.Argument(help=f"The dataset's kind: {', '.join(DATASET_KINDS)}.")],
         root: Annotated[Path, typer.Option(help="The dataset's root folder, in its official layout.")],
         name: Annotated[Optional[str], typer.Option(help="Dataset name in the project (default: KIND).")] = None,
         config: ConfigOpt = Path(DEFAULT_CONFIG_FILE)) -> None:
    """Add a dataset to the project file (created with every stage's defaults if it does not exist)."""
    from affectprep.pipeline.datasets import ADAPTERS
    from affectprep.pipeline.stages import STAGES

    if kind not in ADAPTERS:
        raise ConfigError(f"unknown dataset kind '{kind}'; known: {', '.join(sorted(ADAPTERS))}")
    if not root.is_dir():
        raise ConfigError(f"dataset root {root} is not a folder")
    project = load_project(config) if config.exists() else project_from_dict({}, config)
    name = name or kind
    if name in project.datasets:
        raise ConfigError(f"{config} already has a dataset named '{name}'; choose another --name")
    options = dataclasses.asdict(ADAPTERS[kind].Options())
    project.datasets[name] = DatasetConfig(name, kind, root.resolve(), options)
    for stage, defaults in _default_stage_options(STAGES).items():
        project.stages[stage] = {**defaults, **project.stages.get(stage, {})}
    write_project(project)
    typer.echo(f"added dataset '{name}' ({kind}, {root}) to {config}")


@app.command()
def run(stage: Annotated[Optional[str], typer.Option(help="Run up to and including this stage (default: all).")] = None,
        dataset: DatasetOpt = None,
        config: ConfigOpt = Path(DEFAULT_CONFIG_FILE),
        cache: CacheOpt = None,
        scheduler: Annotated[Optional[str], typer.Option(
            help="tcp://HOST:PORT of a dask.distributed scheduler, or 'inline' (this process, for debugging).")] = None,
        workers: Annotated[Optional[int], typer.Option(min=1, help="Local Dask workers (default: CPU count).")] = None,
        limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N samples of each dataset.")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override an option: STAGE.OPTION=VALUE.")] = None,
        llm: Annotated[Optional[str], typer.Option(
            help="CATE rewriter: openai:<model>, t5:<path-or-id> or template. A new text version; vision is kept.")] = None,
        captioner: Annotated[Optional[str], typer.Option(
            help="Captioner: motion, openai:<model>, hf:<path-or-id> or vllm:<path-or-id>.")] = None,
        base_url: Annotated[Optional[str], typer.Option(
            help="OpenAI-compatible endpoint (e.g. a vLLM server) for openai:<model> backends.")] = None,
        retry_failed: Annotated[bool, typer.Option(help="Process failed samples again.")] = False,
        batch_size: Annotated[int, typer.Option(min=1, help="Samples per Dask task.")] = 4,
        quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
        dry_run: Annotated[bool, typer.Option(
            help="Print the LLM requests the run would send (count, tokens, cost) and stop.")] = False) -> None:
    """Run the pipeline up to STAGE, doing only the samples not yet done for the current config."""
    project = load_project(config, _text_overrides(set_, llm, captioner, base_url), cache)
    if quiet:
        _quiet_model_loading()
    _echo_llm_estimate(project, stage, dataset, limit, retry_failed, dry_run)
    if dry_run:
        return
    hint = _status_command(config, cache, dataset, set_, llm, captioner, base_url)
    _run_and_exit(project, stage, dataset, status_hint=hint, scheduler=scheduler, workers=workers, limit=limit,
                  retry_failed=retry_failed, batch_size=batch_size, progress=not quiet)


def _text_overrides(set_: list[str] | None, llm: str | None, captioner: str | None,
                    base_url: str | None) -> list[str]:
    """--set, plus what --llm, --captioner and --base-url stand for."""
    overrides = list(set_ or [])
    overrides += [f'cate.llm="{llm}"'] if llm else []
    overrides += [f'captions.captioner="{captioner}"'] if captioner else []
    overrides += [f'{stage}.base_url="{base_url}"' for stage in ("captions", "cate")] if base_url else []
    return overrides


def _status_command(config: Path, cache: Path | None, datasets: list[str] | None, set_: list[str] | None,
                    llm: str | None, captioner: str | None, base_url: str | None) -> str:
    """The `status` command that shows the versions this run made: with the run's own options."""
    import shlex

    args = ["affectprep", "status"]
    args += ["--config", str(config)] if config != Path(DEFAULT_CONFIG_FILE) else []
    args += ["--cache", str(cache)] if cache is not None else []
    for flag, values in (("--dataset", datasets), ("--set", set_), ("--llm", [llm] if llm else []),
                         ("--captioner", [captioner] if captioner else []),
                         ("--base-url", [base_url] if base_url else [])):
        for value in values or []:
            args += [flag, value]
    return shlex.join(args)


def _echo_llm_estimate(project: ProjectConfig, stage: str | None, datasets: list[str] | None, limit: int | None,
                       retry_failed: bool, dry_run: bool) -> None:
    """Before an LLM run: what it will send and what that costs at most."""
    from affectprep.pipeline.llm_estimate import any_llm_stage, estimate_run

    if not any_llm_stage(project):
        if dry_run:
            typer.echo("no LLM requests to send: no text stage uses an openai:<model> backend")
        return
    planned = estimate_run(project, stage, datasets, limit, retry_failed)
    estimates = [e for e in planned if e.requests or e.cached]
    if not estimates:
        if planned or dry_run:
            typer.echo("LLM requests to send: none" + (" (every sample is done)" if planned else ""))
        return
    typer.echo("LLM requests to send (estimate; answers already in the response cache cost nothing):")
    for e in estimates:
        typer.echo(f"  {e.line()}")
    if dry_run:
        typer.echo("dry run: nothing sent")


def _quiet_model_loading() -> None:
    """No transformers weight-loading bars, load reports or warnings: in this process, and in the local workers
    it starts (which inherit the environment)."""
    import os
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()


@app.command()
def status(config: ConfigOpt = Path(DEFAULT_CONFIG_FILE), cache: CacheOpt = None, dataset: DatasetOpt = None,
           set_: Annotated[Optional[list[str]], typer.Option("--set", help="As for `run`.")] = None,
           llm: Annotated[Optional[str], typer.Option(help="As for `run`: the CATE version of this rewriter.")] = None,
           captioner: Annotated[Optional[str], typer.Option(help="As for `run`.")] = None,
           base_url: Annotated[Optional[str], typer.Option(help="As for `run`.")] = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
           errors: Annotated[int, typer.Option(help="Failed samples to list per stage (all with --json).")] = 10) -> None:
    """Done, failed, blocked and pending samples per dataset and stage, store sizes, and the failures."""
    from affectprep.pipeline.dag import describe

    project = load_project(config, _text_overrides(set_, llm, captioner, base_url), cache)
    info = describe(project, dataset)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for entry in info:
        typer.echo(f"{entry['dataset']} ({entry['kind']}, {entry['root']})")
        index = entry["index"]
        if index is None:
            typer.echo("  index: not built yet (run `affectprep run`)")
            continue
        excluded = sum(index["excluded"].values())
        typer.echo(f"  {'index':8} ok {index['ok']:>7}  failed {index['failed']:>5}"
                   + (f"  excluded by protocol {excluded}" if excluded else ""))
        _echo_failures(index["failures"], errors)
        _echo_corrupt(index["corrupt_parts"])
        for s in entry["stages"]:
            stale = f" (stale {s['stale']})" if s["stale"] else ""
            typer.echo(f"  {s['name']:8} done {s['done']:>5}/{s['total']:<5} failed {s['failed']:>5}  "
                       f"blocked {s['blocked']:>5}  pending {s['pending']:>5}{stale}  {human_size(s['bytes']):>9}  "
                       f"key {s['key']}" + (f"  backend {s['backend']}" if s.get("backend") else ""))
            _echo_failures(s["failures"], errors)
            _echo_corrupt(s["corrupt_parts"])
            if s["warnings"]:
                typer.echo(f"    {len(s['warnings'])} ok with a warning:")
                _echo_failures([{"sample_id": w["sample_id"], "error": w["warning"]} for w in s["warnings"]], errors)


@app.command()
def report(config: ConfigOpt = Path(DEFAULT_CONFIG_FILE), cache: CacheOpt = None, dataset: DatasetOpt = None,
           out: Annotated[Path, typer.Option(help="Folder for index.html.")] = Path("report"),
           samples: Annotated[int, typer.Option(min=0, help="Clips in each dataset's gallery.")] = 12,
           set_: Annotated[Optional[list[str]], typer.Option("--set", help="As for `run`.")] = None) -> None:
    """A static HTML report (opens from disk): per dataset, stage counts, class balance, a gallery of clips (crops
    with landmarks, caption, top-3 emotions, every CATE version, label), the failures, and the text versions."""
    import time

    from affectprep.report import write_report

    start = time.perf_counter()
    path = write_report(load_project(config, set_ or [], cache), out, dataset, samples)
    typer.echo(f"written: {path} ({time.perf_counter() - start:.1f} s)")


@app.command()
def compact(config: ConfigOpt = Path(DEFAULT_CONFIG_FILE), cache: CacheOpt = None, dataset: DatasetOpt = None) -> None:
    """Merge each store's part files into one (every version of every stage), keeping the newest row per sample."""
    from affectprep import schema
    from affectprep.pipeline.dag import dataset_names
    from affectprep.store import Store, list_keys

    project = load_project(config, [], cache)
    for name in dataset_names(project, dataset):
        for stage in schema.SCHEMAS:
            for key in list_keys(project.cache, name, stage):
                store = Store(project.cache, name, stage, key)
                with store.lock():
                    removed = store.compact()
                if removed:
                    typer.echo(f"{name}/{stage}/{key}: {removed} parts -> {len(store.parts())} "
                               f"({human_size(store.size_bytes())})")


text_app = typer.Typer(no_args_is_help=True, help="Versions of the text assets (captions, CATE texts).")
app.add_typer(text_app, name="text")


@text_app.command("list")
def text_list(config: ConfigOpt = Path(DEFAULT_CONFIG_FILE), cache: CacheOpt = None, dataset: DatasetOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Every stored version of each text stage, with its backend, sample counts, token usage and cost."""
    from affectprep.pipeline.text_versions import text_versions

    project = load_project(config, [], cache)
    versions = text_versions(project, dataset)
    if as_json:
        typer.echo(json.dumps(versions, indent=2))
        return
    typer.echo(f"{'dataset':12} {'stage':8} {'version':16} {'fold':>4} {'backend':34} {'ok':>6} {'failed':>6} "
               f"{'tokens in/out':>17} {'cost USD':>9}  {'built on':16}  current")
    for v in versions:
        fold = "" if v["test_fold"] is None else v["test_fold"]
        typer.echo(f"{v['dataset']:12} {v['stage']:8} {v['version']:16} {fold:>4} {v['backend'][:34]:34} {v['ok']:>6} "
                   f"{v['failed']:>6} {v['prompt_tokens']:>8}/{v['completion_tokens']:<8} {v['cost_usd']:>9.4f}  "
                   f"{v['built_on'] or '':16}  {'*' if v['current'] else ''}")
    if any(v["built_on"] for v in versions):
        typer.echo("(built on: the captions version a CATE version rewrote)")


@text_app.command("show")
def text_show(sample: Annotated[str, typer.Argument(help="A sample id (as `affectprep status` lists them).")],
              dataset: DatasetOpt = None, config: ConfigOpt = Path(DEFAULT_CONFIG_FILE), cache: CacheOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Every stored version's caption and CATE text for one sample, with each version's backend, model, prompt
    and when it was made."""
    import textwrap

    from affectprep.pipeline.text_versions import sample_texts

    found = sample_texts(load_project(config, [], cache), sample, dataset)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    for entry in found:
        typer.echo(f"sample {entry['sample_id']} of {entry['dataset']}, label {entry['label'] or '-'}")
        if not entry["versions"]:
            typer.echo("  no text version holds it yet (run `affectprep run`)")
        for v in entry["versions"]:
            extra = [f"fold {v['test_fold']}"] if v["test_fold"] is not None else []
            extra += [f"built on captions {v['built_on']}"] if v["built_on"] else []
            extra += ["current"] if v["current"] else []
            typer.echo(f"\n  {v['stage']} {v['version']}  {v['backend']}  prompt {v['prompt'] or '-'}  "
                       f"made {v['made'] or '?'}" + "".join(f"  {e}" for e in extra))
            body = v["text"] if v["status"] == "ok" else f"(failed) {v['error']}"
            typer.echo(textwrap.fill(body or "", width=110, initial_indent="    ", subsequent_indent="    "))


@text_app.command("export-batch")
def text_export_batch(stage: Annotated[str, typer.Argument(help="captions or cate")],
                      out: Annotated[Path, typer.Option(help="The JSONL request file to write.")],
                      dataset: Annotated[str, typer.Option(help="The dataset whose pending samples to export.")],
                      fold: Annotated[Optional[int], typer.Option(
                          help="The test fold whose version to use (a dataset with official folds has one CATE "
                               "version per fold).")] = None,
                      config: ConfigOpt = Path(DEFAULT_CONFIG_FILE), cache: CacheOpt = None,
                      set_: Annotated[Optional[list[str]], typer.Option("--set", help="As for `run`.")] = None,
                      dry_run: Annotated[bool, typer.Option(
                          help="Print the number of requests, tokens and cost, and write nothing.")] = False) -> None:
    """Write the pending requests of a text stage as OpenAI Batch API JSONL (also read by `vllm run-batch`)."""
    from affectprep.pipeline.batch_api import export_requests, pending_requests
    from affectprep.pipeline.llm_estimate import estimate_rows

    project = load_project(config, set_ or [], cache)
    plan, rows = pending_requests(project, dataset, stage, fold)
    typer.echo(f"requests to export (estimate): {estimate_rows(dataset, plan, rows).line()}")
    if dry_run:
        typer.echo("dry run: nothing written")
        return
    count = export_requests(project, dataset, stage, out, fold)
    typer.echo(f"wrote {count} request(s) to {out}; custom_id is SAMPLE@VERSION (the sample id and the text "
               f"version's first 12 characters)")


@text_app.command("import-batch")
def text_import_batch(stage: Annotated[str, typer.Argument(help="captions or cate")],
                      results: Annotated[Path, typer.Argument(help="The Batch API results JSONL.")],
                      dataset: Annotated[str, typer.Option(help="The dataset the requests were exported from.")],
                      fold: Annotated[Optional[int], typer.Option(
                          help="The test fold whose version to use (a dataset with official folds has one CATE "
                               "version per fold).")] = None,
                      config: ConfigOpt = Path(DEFAULT_CONFIG_FILE), cache: CacheOpt = None,
                      set_: Annotated[Optional[list[str]], typer.Option("--set", help="As for `run`.")] = None) -> None:
    """Store a Batch API results file as the stage's rows, for the same config it was exported with."""
    from affectprep.pipeline.batch_api import import_results

    summary = import_results(load_project(config, set_ or [], cache), dataset, stage, results, fold)
    typer.echo(f"stored {summary.ok} answer(s), {summary.failed} failed (refused, empty, truncated, too long or "
               f"errored)")
    if summary.skipped_lines:
        typer.echo(f"skipped {len(summary.skipped_lines)} line(s) that are not batch results:")
        for line in summary.skipped_lines[:10]:
            typer.echo(f"      {line}")
        if len(summary.skipped_lines) > 10:
            typer.echo(f"      ... and {len(summary.skipped_lines) - 10} more")
    if summary.already_done:
        typer.echo(f"left {summary.already_done} answer(s) for samples this version already holds as they are")
    if summary.inputs_changed:
        typer.echo(f"left out {summary.inputs_changed} answer(s) to requests whose inputs were redone since the "
                   f"export (export those samples again)")
    if summary.failed or summary.skipped_lines:
        raise typer.Exit(EXIT_FAILED_SAMPLES)


recipe_app = typer.Typer(no_args_is_help=True, help="The models' paper training recipes.")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("show")
def recipe_show(model: Annotated[str, typer.Argument(help="A registered model.")],
                as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """A model's training recipe as its paper gives it: every value with its source, and its ablation rows.
    `affectprep train MODEL` trains with it; --set KEY=VALUE overrides a value."""
    from affectprep.models.recipes import recipe_for, table

    _require_model(model)
    recipe = recipe_for(model).to_json()
    typer.echo(json.dumps(recipe, indent=2) if as_json else table(recipe))


RunArg = Annotated[Path, typer.Argument(help="A run folder written by `affectprep train`.")]


@app.command()
def train(model: Annotated[Optional[str], typer.Argument(help="A registered model (not needed with --resume).")] = None,
          config: ConfigOpt = Path(DEFAULT_CONFIG_FILE),
          dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Expression dataset (default: "
                                                         "the project's only one).")] = None,
          au_dataset: Annotated[Optional[str], typer.Option(help="AU dataset, for models that learn AUs too.")] = None,
          target_dataset: Annotated[Optional[str], typer.Option(
              help="Second-domain dataset with few labels (infrared faces for PCA).")] = None,
          fold: Annotated[Optional[str], typer.Option(
              help="Test on this official fold, or 'all': one run per fold and their mean (default: fixed "
                   "split).")] = None,
          au_fold: Annotated[Optional[int], typer.Option(
              min=1, help="Test the AU dataset on this fold of its own (SSM pairs an expression fold with an AU "
                          "fold; default: --fold).")] = None,
          text_version: Annotated[Optional[str], typer.Option(
              help="Train on this text version (see `affectprep text list`); default: the current CATE texts.")] = None,
          source: Annotated[Optional[str], typer.Option("--from", help="frames (end to end) or features (cached "
                                                        "backbone outputs; heads only).")] = None,
          set_: Annotated[Optional[list[str]], typer.Option("--set", help="OPTION=VALUE over the model's recipe "
                                                            "(epochs=5, batch_size.au=64; `affectprep recipe show "
                                                            "MODEL`), model.OPTION=VALUE (model.matching=cosine), or "
                                                            "a stage's, as for `run` (features.video_encoder=...).")
                          ] = None,
          tiny: Annotated[bool, typer.Option(help="The model's tiny test configuration.")] = False,
          runs: Annotated[Path, typer.Option(help="Folder for run folders.")] = Path("runs"),
          resume: Annotated[Optional[Path], typer.Option(help="Continue this run from its last checkpoint.")] = None,
          stop_after_epoch: Annotated[Optional[int], typer.Option(
              help="End after this epoch's checkpoint (continue later with --resume).")] = None) -> None:
    """Train a model on the cached stores. Under `accelerate launch -m affectprep train ...` on several GPUs."""
    from accelerate import PartialState

    from affectprep.models.runs import RunFolder, TrainConfig, folds_of
    from affectprep.models.train import train as train_run
    from affectprep.models.train import train_folds

    if resume is not None:
        given = [flag for flag, value in (("MODEL", model), ("--set", set_), ("--dataset", dataset),
                                          ("--au-dataset", au_dataset), ("--target-dataset", target_dataset),
                                          ("--fold", fold), ("--au-fold", au_fold), ("--text-version", text_version),
                                          ("--from", source))
                 if value]
        if given:
            raise ConfigError(f"--resume continues a run as it was configured; drop {', '.join(given)}")
        folder = RunFolder(resume)
        train_config, sources = folder.config(), folder.sources()
    else:
        if model is None:
            raise ConfigError("name a model to train (or --resume RUN)")
        train_settings, pipeline_settings = _train_and_pipeline_settings(set_)
        project = load_project(config, pipeline_settings)
        raw = dict(project.train)
        raw["model"] = dict(raw.get("model", {}))
        for item in train_settings:
            key, value = _split_setting(item)
            if key.startswith("model."):
                raw["model"][key[len("model."):]] = value
            elif "." in key:   # one entry of a table option: batch_size.au=128, group_lr.visual_encoder=1e-6
                table, entry = key.split(".", 1)
                if not isinstance(raw.get(table, {}), dict):
                    raw[table] = {}
                raw[table] = {**raw.get(table, {}), entry: value}
            else:
                raw[key] = value
        every_fold = fold == "all"
        if fold is not None and not every_fold:
            raw["fold"] = _fold_number(fold)
        if au_fold is not None:
            raw["au_fold"] = au_fold
        raw.update(model_name=model, **({"source": source} if source is not None else {}))
        raw["tiny"] = tiny or raw.get("tiny", False)
        train_config = TrainConfig.from_dict(raw)
        sources = _training_sources(project, train_config, dataset, au_dataset, target_dataset, text_version)
        main_source = next(iter(sources.values()))
        _require_model(model)
        folds = folds_of(main_source)
        if train_config.fold is None and not every_fold and folds:
            raise ConfigError(f"dataset '{main_source.dataset}' is evaluated on its official folds {folds}: pass "
                              f"--fold K, or --fold all for the whole protocol")
        if every_fold:
            if stop_after_epoch is not None:
                raise ConfigError("--stop-after-epoch stops one run; with --fold all, stop and resume each fold's run")
            if not folds:
                raise ConfigError("--fold all: this dataset has no official folds (it has a fixed split)")
            if "au" in sources and "expression" in sources and train_config.au_fold is None \
                    and not set(folds) <= set(folds_of(sources["au"])):
                raise ConfigError(f"--fold all: the AU dataset has folds {folds_of(sources['au'])}, the expression "
                                  f"dataset {folds}: fix the AU dataset's fold with --au-fold J")
            summary = train_folds(train_config, sources, folds, runs, echo=typer.echo)
            if PartialState().is_main_process:
                typer.echo(f"summary: {summary}")
            return
    path = train_run(train_config, sources, runs, resume=resume, stop_after_epoch=stop_after_epoch, echo=typer.echo)
    if PartialState().is_main_process:
        typer.echo(f"run folder: {path}")


def _require_model(name: str) -> None:
    from affectprep.models.registry import model_builder

    try:
        model_builder(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _fold_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--fold takes a fold number or 'all', got '{text}'") from None


def _train_and_pipeline_settings(items: list[str] | None) -> tuple[list[str], list[str]]:
    """`train --set` takes training options (epochs=5, model.matching=cosine) and, as `run --set` does, stage
    options (features.video_encoder=...), which choose the stores the run reads."""
    from affectprep.pipeline.stages import STAGES

    pipeline = [i for i in items or [] if i.split("=", 1)[0].split(".")[0].strip() in (*STAGES, "stages", "datasets")]
    return [i for i in items or [] if i not in pipeline], pipeline


def _split_setting(item: str) -> tuple[str, object]:
    from affectprep.config import parse_value

    if "=" not in item:
        raise ConfigError(f"--set expects OPTION=VALUE, got '{item}'")
    key, value = item.split("=", 1)
    return key.strip(), parse_value(value.strip())


def _training_sources(project: ProjectConfig, config, dataset: str | None, au_dataset: str | None,
                      target_dataset: str | None, text_version: str | None) -> dict:
    from affectprep.train_sources import resolve_sources

    if dataset is None:
        if len(project.datasets) != 1:
            raise ConfigError(f"name the dataset to train on with --dataset: one of {sorted(project.datasets)}")
        dataset = next(iter(project.datasets))
    features = config.source == "features"
    main = resolve_sources(project, dataset, features=features, text_version=text_version)
    if not main.au_names:
        sources = {"expression": main}
        if au_dataset is not None:
            sources["au"] = resolve_sources(project, au_dataset, features=features,
                                            expression_set=main.facs_ids["expression"])
            if not sources["au"].au_names:
                raise ConfigError(f"--au-dataset '{au_dataset}' has no AU labels")
        if target_dataset is not None:
            sources["target"] = resolve_sources(project, target_dataset, features=features)
            if sources["target"].label_names != main.label_names:
                raise ConfigError(f"--target-dataset '{target_dataset}' has classes {sources['target'].label_names}, "
                                  f"'{dataset}' has {main.label_names}: the two domains must share their classes")
        return sources
    if au_dataset is not None:
        raise ConfigError(f"'{dataset}' is an AU dataset: pass it as --au-dataset and an expression --dataset")
    return {"au": main}


@app.command("eval")
def eval_(run_dir: RunArg,
          views: Annotated[Optional[int], typer.Option(min=1, help="Views per test sample (default: every "
                                                                       "stored view).")] = None,
          dataset: Annotated[Optional[list[str]], typer.Option(
              "--dataset", "-d", help="Test on this other dataset of the project instead, on the classes or AUs it "
                                      "shares with the run's (repeatable: one per task).")] = None,
          fold: Annotated[Optional[int], typer.Option(
              min=1, help="With --dataset: that dataset's fold whose test part to score (default: its fixed test "
                          "split, or every sample of its folds).")] = None,
          config: ConfigOpt = Path(DEFAULT_CONFIG_FILE)) -> None:
    """Score a run's reported model (its validation-selected epoch) on its test data: UAR, WAR, per-class recall,
    confusion matrix (PNG and table), AU F1. Writes eval-views<N>.json and prints the scores. With --dataset, on
    other datasets (cross-dataset testing) as eval-<dataset>-views<N>.json."""
    from affectprep.models.evaluate import evaluate_on, evaluate_run, summary_line
    from affectprep.models.metrics import confusion_table
    from affectprep.models.runs import RunFolder

    if fold is not None and not dataset:
        raise ConfigError("--fold picks the test part of another --dataset; a run's own test data is its own fold")
    if dataset:
        from affectprep.train_sources import resolve_sources

        project = load_project(config)
        features = RunFolder(run_dir).config().source == "features"
        others = {}
        for name in dataset:
            other = resolve_sources(project, name, features=features)
            task = "au" if other.au_names else "expression"
            if task in others:
                raise ConfigError(f"--dataset {others[task].dataset} and {name} are both {task} datasets: one each")
            others[task] = other
        results = evaluate_on(run_dir, others, views, fold)
        names = {task: entry["shared"] for task, entry in results["datasets"].items()}
        written = results["written"]
    else:
        results = evaluate_run(run_dir, views)
        names = {task: s.label_names for task, s in RunFolder(run_dir).sources().items()}
        written = f"eval-views{results['views']}.json"
    typer.echo(summary_line(results))
    if "expression" in results:
        typer.echo(confusion_table(results["expression"]["confusion"], names["expression"]))
    if "au" in results:
        for name, f1 in results["au"]["f1"].items():
            typer.echo(f"  {name:8} F1 {'-' if f1 is None else f'{100 * f1:.1f}'}")
    typer.echo(f"written: {run_dir}/{written}")


@app.command()
def explain(run_dir: RunArg,
            sample: Annotated[Optional[str], typer.Argument(
                help="A sample id of the run's dataset (not needed for SSM, whose matrices do not depend on one)."
            )] = None,
            out: Annotated[Optional[Path], typer.Option(help="Folder for the figures (default: RUN/explain).")] = None
            ) -> None:
    """Draw what the model matched for one sample (GRACE: the transport plan between caption phrases and frames),
    as PNG + JSON pairs named <sample>-<what>."""
    from affectprep.models.explain import explain_sample

    for path in explain_sample(run_dir, sample, out or run_dir / "explain"):
        typer.echo(f"written: {path}")


def _echo_corrupt(parts: list[str]) -> None:
    for part in parts:
        typer.echo(f"      corrupt part moved aside (its samples are redone by the next run): {part}")


def _echo_failures(failures: list[dict], limit: int) -> None:
    for f in failures[:limit]:
        typer.echo(f"      {f['sample_id']}: {f['error']}")
    if len(failures) > limit:
        typer.echo(f"      ... and {len(failures) - limit} more (use --errors N or --json)")


def _run_and_exit(project: ProjectConfig, stage: str | None, datasets: list[str] | None,
                  status_hint: str = "affectprep status", **options) -> None:
    from affectprep.pipeline.dag import run_pipeline

    try:
        report = run_pipeline(project, stage, datasets, **options)
    except KeyboardInterrupt:   # (typer would end with 130 and no word)
        typer.echo("affectprep: interrupted; every sample already written is kept, run the same command again "
                   "to go on", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    typer.echo(f"\n{'dataset':12} {'stage':8} {'total':>7} {'before':>7} {'new ok':>7} {'failed':>7} {'blocked':>7}")
    for name, counts in report.index.items():
        typer.echo(f"{name:12} {'index':8} {counts['ok'] + counts['failed']:>7} {'':>7} {counts['ok']:>7} "
                   f"{counts['failed']:>7}")
    for s in report.stages:
        if s.note:
            typer.echo(f"{s.dataset:12} {s.stage:8} note: {s.note}")
        if s.total == 0:   # a stage with nothing to do for this dataset (audio for videos, vision for speech)
            continue
        typer.echo(f"{s.dataset:12} {s.stage:8} {s.total:>7} {s.done_before:>7} {s.ok:>7} {s.failed_total:>7} "
                   f"{s.blocked:>7}")
    from affectprep.store import QUARANTINED
    for part, reason in QUARANTINED:
        typer.echo(f"corrupt part moved aside, its samples were redone: {part} ({reason})")
    if report.failed:
        typer.echo(f"\n{report.failed} sample(s) failed; `{status_hint}` lists them with their errors.")
        raise typer.Exit(EXIT_FAILED_SAMPLES)
    typer.echo("\nall samples done.")


def _default_stage_options(stages: dict) -> dict[str, dict]:
    return {name: {k: v for k, v in dataclasses.asdict(cls.Config()).items() if v is not None}
            for name, cls in stages.items()}


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    try:
        app()
    except (ConfigError, StoreLocked, SchemaMismatch) as e:
        print(f"affectprep: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as e:   # the disk is full, the cache is read-only, a folder is not ours to write
        where = f" ({e.filename})" if e.filename else ""
        advice = {errno.ENOSPC: "free some space and run the command again (work already written is kept)",
                  errno.EROFS: "the file system is read-only: point --cache or [project] cache elsewhere",
                  errno.EACCES: "no permission: check who owns it, or point --cache elsewhere",
                  errno.EDQUOT: "the disk quota is exceeded: free some space and run the command again"}
        print(f"affectprep: error: {e.strerror or e}{where}; "
              f"{advice.get(e.errno, 'fix that and run the command again')}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
