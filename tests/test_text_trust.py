"""Text versions a user can trust: operational settings are not identity, cost counts what was sent, answers are
bounded, Batch API imports refuse what does not belong to the version, `status` shows the version just run, a
version is named by a prefix, `text show` / `text list` say what each version is, and an LLM run says what it will
send before it sends it. Through the real DAG, the real CLI and a real OpenAI-compatible server on 127.0.0.1."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from affectprep.config import ConfigError, load_project
from affectprep.pipeline.dag import ensure_index, plan_stages, run_pipeline
from affectprep.pipeline.text_versions import text_versions

from pipeline_fixtures import llm_demo_project

CLIPS = 14
CLI = [sys.executable, "-m", "affectprep.cli"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, server):
    project = llm_demo_project(tmp_path_factory.mktemp("trust"), server.base_url, clips=CLIPS, seed=2)
    assert run_pipeline(project, scheduler="inline", progress=False).failed == 0
    return project


def keys(project) -> dict[str, str]:
    index = ensure_index(project, project.datasets["demo"])
    return {p.stage.name: p.key for p in plan_stages(project, index, None)}


def store(project, stage):
    index = ensure_index(project, project.datasets["demo"])
    return next(p.store for p in plan_stages(project, index, None) if p.stage.name == stage)


def cli(*args: str, project=None) -> subprocess.CompletedProcess:
    config = ["--config", str(project.path)] if project is not None else []
    return subprocess.run([*CLI, *args, *config], capture_output=True, text=True)


# ---- issue 10 item 3 ---------------------------------------------------------------------------------------------

def test_operational_settings_are_not_identity(project, server):
    base = keys(project)
    tuned = load_project(project.path, ["captions.concurrency=2", "cate.concurrency=3", "captions.timeout=5",
                                        "cate.timeout=7.5", "captions.max_retries=0", "cate.max_retries=1"])
    assert keys(tuned) == base
    sent = server.request_count
    report = run_pipeline(tuned, scheduler="inline", progress=False)
    assert server.request_count == sent and all(s.ok == 0 for s in report.stages)
    # the endpoint is identity where a server answers, not for the offline motion captioner or the template
    motion = keys(load_project(project.path, ['captions.captioner="motion"', 'cate.llm="template"']))
    moved = keys(load_project(project.path, ['captions.captioner="motion"', 'cate.llm="template"',
                                             'captions.base_url="http://elsewhere:8000/v1"',
                                             'cate.base_url="http://elsewhere:8000/v1"']))
    assert moved == motion
    assert keys(load_project(project.path, ['cate.base_url="http://elsewhere:8000/v1"']))["cate"] != base["cate"]


def test_answers_from_the_response_cache_cost_nothing_in_that_run(project, server):
    first = {r["sample_id"]: r for r in store(project, "cate").read(status="ok").to_pylist()}
    assert sum(r["prompt_tokens"] for r in first.values()) > 0
    # a new version whose requests are the same ones: every answer comes from the response cache
    same_requests = load_project(project.path, ["cate.allow_in_fold=true"])
    assert keys(same_requests)["cate"] != keys(project)["cate"]
    sent = server.request_count
    assert run_pipeline(same_requests, scheduler="inline", progress=False).failed == 0
    assert server.request_count == sent
    rows = store(same_requests, "cate").read(status="ok").to_pylist()
    assert len(rows) == CLIPS and all(r["text"] == first[r["sample_id"]]["text"] for r in rows)
    assert all((r["prompt_tokens"], r["completion_tokens"], r["cost_usd"]) == (0, 0, 0.0) for r in rows)
    version = next(v for v in text_versions(same_requests) if v["version"] == keys(same_requests)["cate"])
    assert (version["prompt_tokens"], version["cost_usd"]) == (0, 0.0)


# ---- issue 10 item 4 ---------------------------------------------------------------------------------------------

def test_an_answer_longer_than_the_request_allows_is_a_failed_sample(project, server):
    bounded = load_project(project.path, ["cate.temperature=0.25", "cate.max_tokens=64"])
    server.fail_next(1, "long")
    server.fail_next(1, "long_word")
    report = run_pipeline(bounded, scheduler="inline", progress=False)
    cate = store(bounded, "cate")
    errors = cate.read(["error"], status="failed").column("error").to_pylist()
    assert report.failed == 2 and len(errors) == 2
    assert all(e.startswith("answer longer than the request allows") for e in errors)
    assert max(len(t) for t in cate.read(["text"], status="ok").column("text").to_pylist()) < 32 * 64


# ---- issue 10 item 9 ---------------------------------------------------------------------------------------------

def test_run_points_to_a_status_that_shows_the_version_it_ran(project, server):
    server.fail_next(2, "refusal")
    out = cli("run", "--scheduler", "inline", "--quiet", "--llm", "openai:gpt-4o-mini",
              "--set", "cate.temperature=0.85", project=project)
    assert out.returncode == 3, out.stderr
    hint = next(line for line in out.stdout.splitlines() if "sample(s) failed" in line)
    command = hint.split("`")[1]
    assert "--llm openai:gpt-4o-mini" in command and "--set cate.temperature=0.85" in command
    status = subprocess.run([*CLI, *shlex.split(command)[1:]], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    cate = next(line for line in status.stdout.splitlines() if line.strip().startswith("cate"))
    assert "failed     2" in cate and status.stdout.count("refused") == 2
    plain = cli("status", project=project)   # the project's own version: no failures
    assert "refused" not in plain.stdout


# ---- issue 10 items 10, 11 ---------------------------------------------------------------------------------------

def _answer(custom_id: str, text: str, tokens: int = 10) -> dict:
    body = {"id": "x", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": tokens, "total_tokens": 100 + tokens}}
    return {"id": f"b-{custom_id}", "custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "request_id": "q", "body": body}}


def test_import_batch_refuses_what_is_not_this_versions(project, tmp_path):
    setting = "cate.temperature=0.3"
    requests = tmp_path / "requests.jsonl"
    out = cli("text", "export-batch", "cate", "--out", str(requests), "--dataset", "demo", "--set", setting,
              project=project)
    assert out.returncode == 0, out.stderr
    ids = [json.loads(line)["custom_id"] for line in requests.read_text().splitlines()]
    answers = [_answer(cid, f"rewritten {i}") for i, cid in enumerate(ids)]
    target = store(load_project(project.path, [setting]), "cate")

    def attempt(lines, *extra):
        path = tmp_path / "results.jsonl"
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        return cli("text", "import-batch", "cate", str(path), "--dataset", "demo", *extra, project=project)

    for lines, extra, message in (
            (answers, (), "answers the export of cate version"),                      # other settings than export
            (answers + [answers[0]], ("--set", setting), "on more than one line"),
            (answers + [_answer("no-such-sample", "x")], ("--set", setting), "not in the export")):
        refused = attempt(lines, *extra)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and message in refused.stderr, \
            refused.stderr
        assert "Traceback" not in refused.stderr and not target.exists()
    assert "cate.temperature = 0.3 at export, 0.0 now" in attempt(answers).stderr
    # the same samples exported for another version too: these results still answer the first export only
    other = "cate.temperature=0.35"
    assert cli("text", "export-batch", "cate", "--out", str(tmp_path / "other.jsonl"), "--dataset", "demo",
               "--set", other, project=project).returncode == 0
    crossed = attempt(answers, "--set", other)
    assert crossed.returncode == 2 and "cate.temperature = 0.3 at export, 0.35 now" in crossed.stderr
    assert not store(load_project(project.path, [other]), "cate").exists()
    # a malformed line is skipped and named; an oversized answer is a failed sample; the rest are stored
    lines = ["{broken", *answers[:-1], _answer(ids[-1], "word " * 5000, tokens=5000)]
    done = attempt(lines, "--set", setting)
    assert done.returncode == 3, done.stderr
    assert f"stored {CLIPS - 1} answer(s), 1 failed" in done.stdout and "skipped 1 line(s)" in done.stdout
    assert "results.jsonl:1: not a JSON line" in done.stdout
    rows = {r["sample_id"]: r for r in target.read().to_pylist()}
    last = ids[-1].rpartition("@")[0]   # custom_id = SAMPLE@VERSION
    assert rows[last]["status"] == "failed" and "longer than the request allows" in rows[last]["error"]


# ---- issue 10 item 12 --------------------------------------------------------------------------------------------

def test_text_versions_are_named_by_a_unique_prefix(project):
    from affectprep.pipeline.text_versions import resolve_version
    key = keys(project)["cate"]
    assert resolve_version(project, "demo", key[:6]).key == key
    (project.cache / "demo" / "cate" / (key[:4] + "zzzz")).mkdir()
    try:
        with pytest.raises(ConfigError, match="ambiguous") as ambiguous:
            resolve_version(project, "demo", key[:4])
        assert key in str(ambiguous.value) and f"{key[:4]}zzzz" in str(ambiguous.value)
        with pytest.raises(ConfigError, match="no text version 'nothing'"):
            resolve_version(project, "demo", "nothing")
        from affectprep.train_sources import resolve_sources
        assert resolve_sources(project, "demo", text_version=key[:8]).stores["texts"].key == key
    finally:
        (project.cache / "demo" / "cate" / (key[:4] + "zzzz")).rmdir()


# ---- issue 14 section 2 ------------------------------------------------------------------------------------------

def test_text_show_and_list_say_what_each_version_is(project):
    current = keys(project)
    listed = json.loads(cli("text", "list", "--json", project=project).stdout)
    cate = next(v for v in listed if v["version"] == current["cate"])
    assert cate["built_on"] == current["captions"] and cate["model"] == "gpt-4o-mini" and cate["made"]
    table = cli("text", "list", project=project).stdout
    assert "built on" in table and current["captions"] in next(l for l in table.splitlines() if current["cate"] in l)
    sample = store(project, "cate").read(["sample_id"], status="ok").column("sample_id").to_pylist()[0]
    rows = {stage: store(project, stage).read(ids=[sample]).to_pylist()[0] for stage in ("captions", "cate")}
    out = cli("text", "show", sample, "--dataset", "demo", project=project)
    assert out.returncode == 0, out.stderr
    for stage, field in (("captions", "caption"), ("cate", "text")):
        header = next(l for l in out.stdout.splitlines() if l.strip().startswith(f"{stage} {current[stage]}"))
        assert "prompt " in header and "made 20" in header and "current" in header
        assert rows[stage][field].split()[0] in out.stdout
    assert f"built on captions {current['captions']}" in out.stdout
    shown = json.loads(cli("text", "show", sample, "--json", project=project).stdout)[0]
    assert {v["version"] for v in shown["versions"]} >= set(current[s] for s in ("captions", "cate"))
    missing = cli("text", "show", "no-such-clip", project=project)
    assert missing.returncode == 2 and "no sample 'no-such-clip'" in missing.stderr


def test_an_llm_run_says_what_it_will_send_and_dry_run_stops_there(project, server, tmp_path):
    sent = server.request_count
    out = cli("run", "--scheduler", "inline", "--quiet", "--dry-run", "--set", "captions.temperature=0.4",
              project=project)
    assert out.returncode == 0, out.stderr
    lines = {line.split("(")[0].split()[1]: line for line in out.stdout.splitlines() if line.startswith("  demo")}
    assert set(lines) == {"captions", "cate"} and "dry run: nothing sent" in out.stdout
    for line in lines.values():
        assert f"{CLIPS} request(s)" in line and "prompt tokens" in line
    # 8 images of a 224-pixel crop a request: 255 tokens each at the tile rule (base 85, one tile 170)
    captions_tokens = int(lines["captions"].split("~")[1].split()[0].replace(",", ""))
    assert captions_tokens >= CLIPS * 8 * 255
    assert "cost <= $" in lines["cate"] and "online" in lines["cate"] and "batch" in lines["cate"]
    assert "no price" in lines["captions"]   # test-vlm has no price
    assert server.request_count == sent
    assert keys(load_project(project.path, ["captions.temperature=0.4"]))["captions"] not in \
        [p.name for p in (project.cache / "demo" / "captions").iterdir()]
    # a version whose answers the response cache holds (its store gone): nothing to send, nothing to pay
    gone = tmp_path / "cate-store"
    (project.cache / "demo" / "cate" / keys(project)["cate"]).rename(gone)
    try:
        cached = cli("run", "--scheduler", "inline", "--quiet", "--dry-run", project=project)
    finally:
        gone.rename(project.cache / "demo" / "cate" / keys(project)["cate"])
    line = next(line for line in cached.stdout.splitlines() if line.startswith("  demo cate"))
    assert f"0 request(s) (and {CLIPS} the response cache answers, free)" in line and "cost <= $0.0000" in line
    requests = tmp_path / "dry.jsonl"
    dry = cli("text", "export-batch", "cate", "--out", str(requests), "--dataset", "demo", "--dry-run",
              "--set", "cate.temperature=0.6", project=project)
    assert dry.returncode == 0 and f"{CLIPS} request(s)" in dry.stdout and "cost <= $" in dry.stdout
    assert not requests.exists()
