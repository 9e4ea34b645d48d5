"""The OpenAI-compatible chat client against a real HTTP server speaking chat-completions (tests/openai_server.py)."""
from __future__ import annotations

import asyncio
import email.utils
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from skimage import data

from affectprep.pipeline.backends.llm import (
    ChatClient, ChatRequest, ChatResult, LLMFailure, is_refusal, price_for, user_message,
)
from affectprep.pipeline.backends.llm_batch import BATCH_PRICE_FACTOR, export_batch_jsonl, import_batch_jsonl
from openai_server import IMAGE_TOKENS, OpenAITestServer

MINI_IN, MINI_OUT = 0.15, 0.60  # gpt-4o-mini, USD per 1M tokens


@pytest.fixture
def server():
    with OpenAITestServer() as running:
        yield running


def make_client(server: OpenAITestServer, **options) -> ChatClient:
    options = {"backoff_base": 0.01, "timeout": 5.0, **options}
    return ChatClient(server.base_url, **options)


def ask(text: str, model: str = "gpt-4o-mini", **options) -> ChatRequest:
    return ChatRequest(model, (user_message(text),), **options)


def face_jpeg(size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((size, size)).save(out, format="JPEG")
    return out.getvalue()


def test_answers_tokens_and_cost_are_exact(server):
    system = {"role": "system", "content": "You describe facial expressions."}
    requests = [ChatRequest("gpt-4o-mini", (system, user_message("describe the face in detail"))),
                ChatRequest("gpt-4o-mini", (system, user_message("what does this face show", [face_jpeg(64)] * 2)))]
    with make_client(server) as client:
        results = client.complete_many(requests)
    assert all(isinstance(r, ChatResult) and not r.cached for r in results)
    plain, with_images = results
    assert plain.text.startswith("caption for ") and with_images.text.endswith("with 2 images 64x64 64x64")
    assert plain.prompt_tokens == 4 + 5
    assert with_images.prompt_tokens == 4 + 5 + 2 * IMAGE_TOKENS
    for result in results:
        assert result.completion_tokens == len(result.text.split())
        assert result.cost_usd == pytest.approx((result.prompt_tokens * MINI_IN
                                                 + result.completion_tokens * MINI_OUT) / 1e6, rel=1e-12)
        assert result.finish_reason == "stop" and result.model == "gpt-4o-mini"
    stats = client.stats
    assert (stats.requests_sent, stats.retries, stats.cache_hits) == (2, 0, 0)
    assert stats.prompt_tokens == sum(r.prompt_tokens for r in results)
    assert stats.completion_tokens == sum(r.completion_tokens for r in results)
    assert stats.cost_usd == pytest.approx(sum(r.cost_usd for r in results), rel=1e-12)
    # What went over the wire is exactly the request body (the images as base64 JPEG data: URLs).
    assert sorted(server.bodies, key=json.dumps) == sorted((r.body() for r in requests), key=json.dumps)
    image = requests[1].messages[1]["content"][0]["image_url"]["url"]
    assert image.startswith("data:image/jpeg;base64,")


def test_unknown_model_costs_nothing_and_is_noted_once(server):
    with make_client(server, prices={"my-vlm": (1.0, 2.0)}) as client:
        local = client.complete_many([ask("a", model="Qwen/Qwen2-VL-7B"), ask("b", model="Qwen/Qwen2-VL-7B")])
        priced = client.complete_many([ask("c d", model="my-vlm")])[0]
    assert [r.cost_usd for r in local] == [0.0, 0.0]
    assert client.stats.unpriced_models == ["Qwen/Qwen2-VL-7B"]
    assert priced.cost_usd == pytest.approx((2 * 1.0 + 3 * 2.0) / 1e6, rel=1e-12)
    assert price_for("gpt-4o-mini-2024-07-18", client.prices) == (MINI_IN, MINI_OUT)
    assert price_for("gpt-4o-2024-08-06", client.prices) == (2.50, 10.00)


def test_429_waits_at_least_retry_after_seconds(server):
    server.fail_next(1, "rate_limit", retry_after="1")
    with make_client(server) as client:
        [result] = client.complete_many([ask("hello")])
    assert isinstance(result, ChatResult)
    assert server.arrival_times[1] - server.arrival_times[0] >= 1.0  # backoff_base alone would wait ~10 ms
    assert (client.stats.requests_sent, client.stats.retries) == (2, 1)


def test_503_waits_until_a_retry_after_http_date(server):
    server.fail_next(1, "unavailable", retry_after=email.utils.formatdate(time.time() + 2.5, usegmt=True))
    with make_client(server) as client:
        [result] = client.complete_many([ask("hello")])
    assert isinstance(result, ChatResult)
    assert server.arrival_times[1] - server.arrival_times[0] >= 1.0


def test_server_errors_are_retried_then_reported(server):
    server.fail_next(2, "server_error")
    with make_client(server, max_retries=3) as client:
        [result] = client.complete_many([ask("hello")])
        assert isinstance(result, ChatResult) and client.stats.retries == 2
    server.fail_next(3, "server_error")
    with make_client(server, max_retries=2) as client:
        [failure] = client.complete_many([ask("again")])
    assert isinstance(failure, LLMFailure)
    assert str(failure) == "HTTP 500 after 3 attempts: The server had an error while processing your request"


def test_timeouts_are_retried_then_reported():
    with OpenAITestServer(slow_seconds=3.0) as server:
        server.fail_next(1, "slow")
        with make_client(server, timeout=0.3) as client:
            [result] = client.complete_many([ask("hello")])
            assert isinstance(result, ChatResult) and client.stats.retries == 1
        server.fail_next(2, "slow")
        with make_client(server, timeout=0.3, max_retries=1) as client:
            [failure] = client.complete_many([ask("again")])
    assert str(failure) == "timed out after 2 attempts (timeout 0.3 s)"


def test_client_errors_fail_at_once(server):
    server.fail_next(1, "bad_request")
    with make_client(server) as client:
        [failure] = client.complete_many([ask("hello")])
    assert str(failure) == "HTTP 400: Invalid value for 'messages'"
    assert server.request_count == 1 and client.stats.retries == 0
    with ChatClient(server.base_url + "/nowhere", backoff_base=0.01) as client:
        [failure] = client.complete_many([ask("hello")])
    assert str(failure).startswith("HTTP 404 not found: no route /v1/nowhere/chat/completions (model 'gpt-4o-mini'")
    assert client.stats.requests_sent == 1


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with ChatClient(f"http://127.0.0.1:{port}/v1", backoff_base=0.01, max_retries=1) as client:
        [failure] = client.complete_many([ask("hello")])
    assert isinstance(failure, LLMFailure) and str(failure).startswith("connection failed after 2 attempts")


def test_bad_answers_fail_alone_with_readable_messages(server):
    expected = {
        "refusal": "refused: I'm sorry, I can't help with that.",
        "refusal_text": "refused: I'm sorry, but I can't assist with that request.",
        "empty": "empty answer",
        "length": "truncated answer (finish_reason=length)",
        "content_filter": "blocked by the content filter (finish_reason=content_filter)",
    }
    for fault in [*expected, "malformed"]:
        server.fail_matching(f"<{fault}>", fault)
    prompts = ["good one", *(f"clip <{fault}>" for fault in [*expected, "malformed"]), "good two"]
    with make_client(server) as client:
        results = client.complete_many([ask(p) for p in prompts])
    assert isinstance(results[0], ChatResult) and isinstance(results[-1], ChatResult)
    messages = {fault: str(r) for fault, r in zip([*expected, "malformed"], results[1:-1])}
    assert all(isinstance(r, LLMFailure) for r in results[1:-1])
    assert {fault: messages[fault] for fault in expected} == expected
    assert messages["malformed"].startswith("malformed response: not JSON")
    assert server.request_count == len(prompts)  # answers are judged, not retried
    # A refusal is billed: its tokens count in the stats even though it is no answer.
    assert client.stats.completion_tokens > sum(r.completion_tokens for r in (results[0], results[-1]))


def test_answers_longer_than_the_request_allows_fail(server, tmp_path):
    """By the tokens the server counted, and by characters where the count cannot be trusted (one 1 MB "token")."""
    server.fail_matching("<long>", "long")
    server.fail_matching("<long_word>", "long_word")
    with make_client(server, cache_dir=tmp_path / "cache") as client:
        good, long, long_word = client.complete_many([ask("fine", max_tokens=64), ask("clip <long>", max_tokens=64),
                                                      ask("clip <long_word>", max_tokens=64)])
    assert isinstance(good, ChatResult)
    assert str(long).startswith("answer longer than the request allows (") and "max_tokens 64" in str(long)
    assert str(long_word).startswith("answer longer than the request allows (1000000 characters for max_tokens 64")
    # an oversized answer a cache holds (written before answers were bounded) is asked again, not served
    key = ask("fine", max_tokens=64).key(client.base_url)
    record = json.loads((tmp_path / "cache" / key[:2] / f"{key}.json").read_text())
    (tmp_path / "cache" / key[:2] / f"{key}.json").write_text(json.dumps({**record, "text": "y" * 10_000}))
    sent = server.request_count
    with make_client(server, cache_dir=tmp_path / "cache") as client:
        again = client.complete_many([ask("fine", max_tokens=64)])[0]
    assert server.request_count == sent + 1 and not again.cached and again.text == good.text


def test_error_bodies_never_carry_the_api_key(server, monkeypatch):
    monkeypatch.setenv("AFFECTPREP_TEST_LLM_KEY", "sk-proj-secret-abcdef123456")
    server.fail_next(1, "unauthorized")
    with make_client(server, api_key_env="AFFECTPREP_TEST_LLM_KEY") as client:
        failure = client.complete_many([ask("a")])[0]
    assert isinstance(failure, LLMFailure) and str(failure).startswith("HTTP 401 unauthorised: Incorrect API key")
    assert "abcdef123456" not in str(failure) and "[redacted]" in str(failure)
    assert server.authorizations[0] == "Bearer sk-proj-secret-abcdef123456"   # it was sent, only not stored


def test_a_request_too_short_for_max_tokens_is_truncated(server):
    with make_client(server) as client:
        [failure] = client.complete_many([ask("hello", max_tokens=2)])
    assert str(failure) == "truncated answer (finish_reason=length)"


def test_refusal_phrases():
    for text in ["I'm sorry, but I can't assist with that.", "I cannot assist with this request.",
                 "Sorry, I can\u2019t help with that.", "I'm unable to identify people in images.",
                 "I apologize, but I am unable to analyze this video."]:
        assert is_refusal(text), text
    for text in ["The person frowns; I cannot see the mouth clearly, but the brows are lowered.",
                 "A sorry-looking face with lowered brows and a trembling lip.",
                 "I'm sorry, I can't help with that. " + "The face shows fear. " * 20]:
        assert not is_refusal(text), text


def test_cache_makes_a_rerun_send_nothing(server, tmp_path):
    server.fail_matching("<refuse>", "refusal")
    requests = [ask(f"clip {i}") for i in range(5)] + [ask("clip <refuse>")]
    with make_client(server, cache_dir=tmp_path / "cache") as client:
        first = client.complete_many(requests)
    assert server.request_count == 6 and isinstance(first[-1], LLMFailure)

    with make_client(server, cache_dir=tmp_path / "cache") as client:
        again = client.complete_many(requests[:5])
    assert server.request_count == 6  # zero HTTP requests
    assert [r.text for r in again] == [r.text for r in first[:5]] and all(r.cached for r in again)
    assert [r.cost_usd for r in again] == [r.cost_usd for r in first[:5]]
    assert (client.stats.cache_hits, client.stats.requests_sent, client.stats.cost_usd) == (5, 0, 0.0)

    with make_client(server, cache_dir=tmp_path / "cache") as client:
        changed = client.complete_many([ask("clip 0", temperature=0.7), requests[-1]])
    assert server.request_count == 8  # a new temperature is a new key, and a failure was never cached
    assert not changed[0].cached and isinstance(changed[1], LLMFailure)


def test_request_keys():
    request = ask("hello")
    assert request.key("http://a/v1") == ask("hello", temperature=0).key("http://a/v1/")
    assert len(request.key("http://a/v1")) == 64
    assert request.key("http://a/v1") != request.key("http://b/v1")
    assert request.key("http://a/v1") != ask("hello", seed=1).key("http://a/v1")
    assert request.key("http://a/v1") != ask("hello", model="gpt-4o").key("http://a/v1")
    assert {request, ask("hello")} == {request}


def test_invalid_requests_fail_alone(server):
    unhashable = ChatRequest("gpt-4o-mini", ({"role": "user", "content": b"raw bytes"},))
    with make_client(server) as client:
        results = client.complete_many([ask("fine"), unhashable, "not a request"])
    assert isinstance(results[0], ChatResult)
    assert str(results[1]).startswith("invalid request: the request cannot be hashed")
    assert str(results[2]) == "invalid request: expected a ChatRequest, got str"
    with pytest.raises(ValueError, match="non-empty sequence"):
        ChatRequest("gpt-4o-mini", ())


def test_concurrency_is_bounded_across_threads():
    with OpenAITestServer(latency=0.05) as server, make_client(server, concurrency=4) as client:
        batches = [[ask(f"thread {t} clip {i}") for i in range(8)] for t in range(3)]
        with ThreadPoolExecutor(3) as pool:
            results = [r for batch in pool.map(client.complete_many, batches) for r in batch]
    assert all(isinstance(r, ChatResult) for r in results) and server.request_count == 24
    assert 2 <= server.max_in_flight <= 4


def test_identical_requests_in_one_call_are_sent_once(server):
    with make_client(server) as client:
        results = client.complete_many([ask("same")] * 3)
    assert server.request_count == 1 and len({r.text for r in results}) == 1


def test_usable_from_inside_a_running_event_loop(server):
    async def notebook_cell():
        with make_client(server) as client:
            return client.complete_many([ask("hello")])

    [result] = asyncio.run(notebook_cell())
    assert isinstance(result, ChatResult)


def test_api_key_comes_only_from_the_named_variable(server, monkeypatch):
    monkeypatch.setenv("AFFECTPREP_TEST_LLM_KEY", "sk-test-123")
    with make_client(server, api_key_env="AFFECTPREP_TEST_LLM_KEY") as client:
        client.complete_many([ask("a")])
    monkeypatch.delenv("AFFECTPREP_TEST_LLM_KEY")
    with make_client(server, api_key_env="AFFECTPREP_TEST_LLM_KEY") as client:
        client.complete_many([ask("b")])
    assert server.authorizations[0] == "Bearer sk-test-123"
    assert server.authorizations[1].startswith("Bearer ") and "sk-test-123" not in server.authorizations[1]


def test_batch_export_matches_the_batch_api_request_format(tmp_path):
    requests = [("clip-1", ask("hello")), ("clip-2", ChatRequest("gpt-4o-mini", (user_message("look", [face_jpeg(32)]),),
                                                                 max_tokens=64, seed=None))]
    path = tmp_path / "batch" / "requests.jsonl"
    export_batch_jsonl(requests, path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["clip-1", "clip-2"]
    assert all(line["method"] == "POST" and line["url"] == "/v1/chat/completions" for line in lines)
    assert lines[0]["body"] == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}],
                                "max_tokens": 256, "temperature": 0.0, "seed": 0}
    assert "seed" not in lines[1]["body"] and lines[1]["body"]["messages"][0]["content"][0]["type"] == "image_url"
    with pytest.raises(ValueError, match="duplicate batch custom_id"):
        export_batch_jsonl([("x", ask("a")), ("x", ask("b"))], tmp_path / "dup.jsonl")


def _completion_body(content, finish="stop", refusal=None, model="gpt-4o-mini-2024-07-18"):
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}}


def test_batch_results_import_with_the_same_checks(tmp_path):
    def ok(custom_id, body):
        return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "error": None,
                "response": {"status_code": 200, "request_id": "req_1", "body": body}}

    lines = [
        ok("good", _completion_body("The brows are raised and the mouth is open in surprise.")),
        ok("refused", _completion_body(None, refusal="I'm sorry, I can't help with that.")),
        ok("refused-text", _completion_body("I cannot assist with that.")),
        ok("empty", _completion_body("   ")),
        ok("cut", _completion_body("The brows are", finish="length")),
        ok("broken", {"id": "x", "choices": []}),
        {"id": "batch_req_2", "custom_id": "openai-error", "response": None,
         "error": {"code": "batch_expired", "message": "This request could not be executed before the window expired."}},
        {"id": "vllm-1", "custom_id": "vllm-error", "error": "Model 'foo' not found",
         "response": {"status_code": 400, "request_id": "vllm-batch-1"}},
        {"id": "batch_req_3", "custom_id": "http-500", "error": None,
         "response": {"status_code": 500, "request_id": "req_3",
                      "body": {"error": {"message": "The server had an error", "type": "server_error"}}}},
        ok("local", _completion_body("A calm face.", model="Qwen/Qwen2-VL-7B-Instruct")),
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in reversed(lines)) + "\n")
    read = import_batch_jsonl(path)
    assert read.skipped == [] and read.duplicates == []
    results = read.answers
    good = results["good"]
    assert isinstance(good, ChatResult) and good.text.startswith("The brows are raised")
    assert (good.prompt_tokens, good.completion_tokens) == (1000, 200)
    assert good.cost_usd == pytest.approx(BATCH_PRICE_FACTOR * (1000 * MINI_IN + 200 * MINI_OUT) / 1e6, rel=1e-12)
    assert results["local"].cost_usd == 0.0
    failures = {key: str(value) for key, value in results.items() if isinstance(value, LLMFailure)}
    assert failures == {
        "refused": "refused: I'm sorry, I can't help with that.",
        "refused-text": "refused: I cannot assist with that.",
        "empty": "empty answer",
        "cut": "truncated answer (finish_reason=length)",
        "broken": "malformed response: no choices",
        "openai-error": "batch request failed: batch_expired: This request could not be executed before the "
                        "window expired.",
        "vllm-error": "batch request failed: Model 'foo' not found",
        "http-500": "HTTP 500: The server had an error",
    }
    # a line that is not a result is skipped and named; the others are still read
    path.write_text(json.dumps(lines[0]) + "\n{not json\n" + json.dumps({"no": "id"}) + "\n"
                    + json.dumps(lines[-1]) + "\n" + json.dumps(lines[0]) + "\n")
    read = import_batch_jsonl(path)
    assert set(read.answers) == {"good", "local"} and read.duplicates == ["good"]
    assert len(read.skipped) == 2 and read.skipped[0].startswith(f"{path}:2: not a JSON line")
    assert read.skipped[1] == f"{path}:3: not a batch result (no custom_id)"
