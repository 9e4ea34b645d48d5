"""The text half: captions, out-of-fold emotions, CATE and FACS, through the real DAG, the real OpenAI-compatible
HTTP protocol (a server on 127.0.0.1) and tiny real models."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from affectprep.config import load_project
from affectprep.pipeline import facs
from affectprep.pipeline.dag import describe, ensure_index, plan_stages, run_pipeline
from affectprep.pipeline.text_versions import text_versions

from openai_server import IMAGE_TOKENS, count_tokens
from pipeline_fixtures import llm_demo_project

VISION = ("index", "frames", "faces")


@pytest.fixture(scope="module")
def project(tmp_path_factory, server):
    project = llm_demo_project(tmp_path_factory.mktemp("text"), server.base_url, clips=21, seed=4)
    report = run_pipeline(project, scheduler="inline", progress=False)
    assert report.failed == 0
    return project


def stores(project):
    index = ensure_index(project, project.datasets["demo"])
    return {"index": index, **{p.stage.name: p.store for p in plan_stages(project, index, None)}}


def test_captions_send_the_aligned_frames_and_the_facs_prompt(project, server):
    st = stores(project)
    captions = st["captions"].read(status="ok").to_pylist()
    assert len(captions) == 21 and all(r["backend"] == "openai" and r["model"] == "test-vlm" for r in captions)
    vlm = [b for b in server.bodies if b["model"] == "test-vlm"]
    parts = vlm[0]["messages"][0]["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    assert len(images) == 8 and images[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    text = next(p["text"] for p in parts if p["type"] == "text")
    assert "brow" in text and "jaw" in text


def test_cate_rewrites_caption_plus_out_of_fold_top3(project, server):
    st = stores(project)
    cate = {r["sample_id"]: r for r in st["cate"].read(status="ok").to_pylist()}
    emotions = {r["sample_id"]: r for r in st["emotions"].read(status="ok").to_pylist()}
    assert len(cate) == len(emotions) == 21
    row = next(iter(cate.values()))
    assert len(row["descriptors"]) == 3 and all(d.startswith("an emotion of ") for d in row["descriptors"])
    # the rewrite request carried this sample's caption and its three descriptor phrases with probabilities
    assert any(row["caption"] in json.dumps(b) and all(d in json.dumps(b) for d in row["descriptors"])
               for b in server.bodies if b["model"] == "gpt-4o-mini")
    # cost = tokens x the gpt-4o-mini price per 1M tokens, exactly as the server counted them
    assert row["cost_usd"] == pytest.approx((row["prompt_tokens"] * 0.15 + row["completion_tokens"] * 0.60) / 1e6)
    assert row["completion_tokens"] == count_tokens(row["text"])


def test_emotion_predictions_never_come_from_a_model_that_saw_the_label(project):
    st = stores(project)
    models = json.loads((st["emotions"].path / "models.json").read_text())
    index = {r["sample_id"]: r for r in st["index"].read(status="ok").to_pylist()}
    for row in st["emotions"].read(status="ok").to_pylist():
        assert not row["in_fold"]
        assert row["sample_id"] not in models[row["model_id"]]["trained_on"]
        assert index[row["sample_id"]]["fold"] not in models[row["model_id"]]["groups_trained_on"]
        assert len(row["top_probs"]) == 3 and row["top_probs"] == sorted(row["top_probs"], reverse=True)


def test_rerun_sends_zero_requests(project, server):
    before = server.request_count
    report = run_pipeline(project, scheduler="inline", progress=False)
    assert server.request_count == before and report.failed == 0
    assert all(s.ok == 0 for s in report.stages)


def test_llm_failures_are_recorded_and_the_run_carries_on(tmp_path, server, project):
    changed = load_project(project.path, ["cate.temperature=0.5", "cate.max_retries=1"])   # a new version
    server.fail_next(2, "refusal")
    report = run_pipeline(changed, scheduler="inline", progress=False)
    cate = stores(changed)["cate"]
    failed = cate.read(["sample_id", "error"], status="failed").to_pylist()
    assert len(failed) == 2 and all(f["error"].startswith("refused") for f in failed)
    assert len(cate.read(["sample_id"], status="ok")) == 19
    assert report.failed == 2
    server.fail_next(1, "empty")
    again = run_pipeline(changed, scheduler="inline", progress=False, retry_failed=True)
    failed = cate.read(["sample_id", "error"], status="failed").to_pylist()
    assert [f["error"] for f in failed] == ["empty answer"] and again.failed == 1


def _vision_files(project):
    cache = project.cache / "demo"
    return {str(p.relative_to(cache)): (p.stat().st_size, p.stat().st_mtime_ns)
            for stage in VISION for p in sorted((cache / stage).rglob("*")) if p.is_file() and p.name != ".lock"}


def test_switching_the_llm_keeps_every_vision_store(project, tmp_path):
    from tiny_models import save_t5_that_writes
    vision_before = _vision_files(project)
    keys_before = {k: s.key for k, s in stores(project).items()}
    t5 = save_t5_that_writes(tmp_path / "t5")
    for llm in (f"t5:{t5}", "template"):
        switched = load_project(project.path, [f'cate.llm="{llm}"'])
        report = run_pipeline(switched, scheduler="inline", progress=False)
        assert report.failed == 0
        new = {r.stage: r for r in report.stages}
        assert new["cate"].ok == 21 and all(new[s].ok == 0 for s in ("frames", "faces", "captions", "emotions"))
        keys = {k: s.key for k, s in stores(switched).items()}
        assert {k: keys[k] for k in (*VISION, "captions", "emotions")} == \
               {k: keys_before[k] for k in (*VISION, "captions", "emotions")}
        assert keys["cate"] != keys_before["cate"]
    assert _vision_files(project) == vision_before
    versions = [v for v in text_versions(switched) if v["stage"] == "cate"]
    assert {v["backend"] for v in versions} >= {"openai:gpt-4o-mini", f"t5:{t5}", "template"}
    template = next(v for v in versions if v["backend"] == "template")
    assert template["current"] and template["ok"] == 21 and template["cost_usd"] == 0
    row = stores(switched)["cate"].read(status="ok").to_pylist()[0]
    assert row["text"].startswith(row["caption"].rstrip()) and "an emotion of" in row["text"]


def test_grace_table_iv_switches_each_make_their_own_text_version(project, server):
    base = stores(project)["cate"]
    base_rows = {r["sample_id"]: r for r in base.read(status="ok").to_pylist()}
    keys = {base.key}
    for switch in ("descriptor_phrases", "label_guidance"):
        ablated = load_project(project.path, [f"cate.{switch}=false"])
        sent_before = len(server.bodies)
        assert run_pipeline(ablated, scheduler="inline", progress=False).failed == 0
        store = stores(ablated)["cate"]
        keys.add(store.key)
        rows = store.read(status="ok").to_pylist()
        prompts = [json.dumps(b) for b in server.bodies[sent_before:] if b["model"] == "gpt-4o-mini"]
        # (identical prompts, e.g. the same caption with no guidance, are answered once from the response cache)
        assert len(rows) == 21 and prompts and all("an emotion of" not in p for p in prompts)
        row = rows[0]
        assert row["caption"] == base_rows[row["sample_id"]]["caption"]
        if switch == "descriptor_phrases":   # the top-3 as bare class names with their probabilities
            emotions = stores(ablated)["emotions"].read(ids=[row["sample_id"]]).to_pylist()[0]
            assert row["descriptors"] == [f"{n} (p = {p:.2f})" for n, p in
                                          zip(emotions["top_names"][:3], emotions["top_probs"][:3])]
            assert any(all(d in p for d in row["descriptors"]) for p in prompts)
        else:                                # no predicted emotions at all: the caption alone
            assert row["descriptors"] == [] and all("classifier predicted" not in p for p in prompts)
        # With the template backend, no guidance leaves the initial caption unchanged (Table II without CATE).
        copied = load_project(project.path, [f"cate.{switch}=false", 'cate.llm="template"'])
        assert run_pipeline(copied, scheduler="inline", progress=False).failed == 0
        text = stores(copied)["cate"].read(status="ok").to_pylist()[0]
        if switch == "label_guidance":
            assert text["text"] == text["caption"]
        else:
            assert "an emotion of" not in text["text"] and text["text"].startswith(text["caption"].rstrip())
    assert len(keys) == 3


def test_text_list_cli(project):
    out = subprocess.run([sys.executable, "-m", "affectprep.cli", "text", "list", "--config", str(project.path),
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    versions = json.loads(out.stdout)
    caption = next(v for v in versions if v["stage"] == "captions" and v["current"])
    assert caption["ok"] == 21 and caption["backend"] == "openai:test-vlm"
    assert caption["prompt_tokens"] >= 21 * 8 * IMAGE_TOKENS


def test_in_fold_predictions_are_refused_unless_allowed(project, tmp_path):
    from tiny_models import save_video_classifier
    checkpoint = save_video_classifier(tmp_path / "clf", labels=stores(project)["index"].metadata()
                                       ["affectprep.label_names"])
    leaky = load_project(project.path, [f'emotions.model="hf:{checkpoint}"', 'cate.llm="template"'])
    report = run_pipeline(leaky, scheduler="inline", progress=False)
    st = stores(leaky)
    assert all(r["in_fold"] for r in st["emotions"].read(status="ok").to_pylist())  # trained_on unknown
    errors = st["cate"].read(["error"], status="failed").column("error").to_pylist()
    assert len(errors) == 21 and all("in-fold" in e for e in errors) and report.failed == 21
    allowed = load_project(leaky.path, [f'emotions.model="hf:{checkpoint}"', 'cate.llm="template"',
                                        "cate.allow_in_fold=true"])
    assert run_pipeline(allowed, scheduler="inline", progress=False).failed == 0
    clean = load_project(leaky.path, [f'emotions.model="hf:{checkpoint}"', 'emotions.trained_on="none"',
                                      'cate.llm="template"'])
    assert run_pipeline(clean, scheduler="inline", progress=False).failed == 0


def test_facs_asset_is_stored_with_every_pairing(project):
    facs = stores(project)["facs"].read(status="ok").to_pylist()
    by_id = {r["sample_id"]: r for r in facs}
    assert {"basic7", "mafw11", "bp4d12", "disfa8", "basic7+bp4d12", "mafw11+disfa8"} <= set(by_id)
    prior = by_id["basic7+bp4d12"]["prior"]
    assert len(prior) == 7 and len(prior[0]) == 12
    info = {s["stage"]: s for s in describe(project)[0]["stages"]}
    assert info["facs"]["failed"] == 0


def test_missing_api_key_is_a_config_error(project, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    from affectprep.config import ConfigError
    needs_key = load_project(project.path, ['cate.llm="openai:gpt-4o-mini"', "cate.base_url=false",
                                            "cate.temperature=0.9"])
    needs_key.stages["cate"].pop("base_url")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        run_pipeline(needs_key, scheduler="inline", progress=False)


def test_batch_api_round_trip(project, tmp_path):
    batch = ["cate.temperature=0.3"]   # a version nobody has built yet: every sample is pending
    requests = tmp_path / "requests.jsonl"
    cli = [sys.executable, "-m", "affectprep.cli", "text"]
    out = subprocess.run([*cli, "export-batch", "cate", "--out", str(requests), "--dataset", "demo",
                          "--config", str(project.path), "--set", batch[0]], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    assert len(lines) == 21 and lines[0]["url"] == "/v1/chat/completions" and lines[0]["method"] == "POST"
    assert lines[0]["body"]["model"] == "gpt-4o-mini" and lines[0]["body"]["temperature"] == 0.3
    results = tmp_path / "results.jsonl"
    answers = []
    for i, line in enumerate(lines):
        message = {"role": "assistant", "content": f"rewritten {i}"} if i else \
            {"role": "assistant", "content": None, "refusal": "I can't help with that."}
        body = {"id": f"r{i}", "object": "chat.completion", "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}
        answers.append({"id": f"b{i}", "custom_id": line["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": f"q{i}", "body": body}})
    results.write_text("\n".join(json.dumps(a) for a in answers) + "\n")
    out = subprocess.run([*cli, "import-batch", "cate", str(results), "--dataset", "demo",
                          "--config", str(project.path), "--set", batch[0]], capture_output=True, text=True)
    assert out.returncode == 3 and "stored 20 answer(s), 1 failed" in out.stdout, out.stderr
    cate = stores(load_project(project.path, batch))["cate"]
    rows = {r["sample_id"]: r for r in cate.read().to_pylist()}
    sample = [line["custom_id"].rpartition("@")[0] for line in lines]   # custom_id = SAMPLE@VERSION
    assert {line["custom_id"].rpartition("@")[2] for line in lines} == {cate.key[:12]}
    assert rows[sample[0]]["status"] == "failed" and "refused" in rows[sample[0]]["error"]
    ok = rows[sample[1]]
    assert ok["text"] == "rewritten 1" and ok["cost_usd"] == pytest.approx((100 * 0.15 + 10 * 0.6) / 1e6 * 0.5)


def test_status_counts_labelled_stages_and_assets(project):
    info = {s["stage"]: s for s in describe(project)[0]["stages"]}
    assets = len(facs.EXPRESSION_SETS) + len(facs.AU_SETS) + len(facs.EXPRESSION_SETS) * len(facs.AU_SETS)
    assert info["facs"]["total"] == info["facs"]["done"] == assets and info["facs"]["pending"] == 0
    assert info["emotions"]["total"] == info["cate"]["total"] == 21
    assert all(s["pending"] == 0 for s in info.values())
