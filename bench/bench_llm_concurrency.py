"""LLM client throughput against the local test server (tests/openai_server.py), which answers after a fixed latency.

1. complete_many over distinct requests (no cache) at concurrency 16 and at concurrency 1. Target: >= 10x.
2. A cached rerun over 1,000 requests. Targets: 0 requests sent, < 10 s.
Figures only; nothing is asserted.
Usage: python bench/bench_llm_concurrency.py [--requests 64] [--latency 0.2] [--cached 1000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from affectprep.pipeline.backends.llm import ChatClient, ChatRequest, LLMFailure, user_message

from common import timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from openai_server import OpenAITestServer  # noqa: E402 - the server lives with the tests


def clip_requests(count: int, tag: str) -> list[ChatRequest]:
    return [ChatRequest("gpt-4o-mini", (user_message(f"Describe the facial expression in clip {tag}-{i:05d}."),))
            for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per answer")
    parser.add_argument("--cached", type=int, default=1000)
    args = parser.parse_args()

    seconds: dict[str, float] = {}
    with OpenAITestServer(latency=args.latency) as server:
        for concurrency in (16, 1):
            with ChatClient(server.base_url, concurrency=concurrency) as client:
                client.complete_many(clip_requests(1, f"warm-up{concurrency}"))  # a stage's client is long-lived
                requests = clip_requests(args.requests, f"c{concurrency}")
                with timed(concurrency, seconds):
                    results = client.complete_many(requests)
            failed = sum(isinstance(r, LLMFailure) for r in results)
            print(f"concurrency {concurrency:2d}: {args.requests / seconds[concurrency]:7.1f} requests/s "
                  f"({args.requests} requests in {seconds[concurrency]:.2f} s, {failed} failed)")
        print(f"speed-up 16 vs 1: {seconds[1] / seconds[16]:.1f}x (target >= 10x)")

        with tempfile.TemporaryDirectory(prefix="affectprep-llm-bench-") as cache_dir:
            requests = clip_requests(args.cached, "cached")
            server.latency = 0.0  # filling the cache is not what is measured
            with ChatClient(server.base_url, concurrency=16, cache_dir=Path(cache_dir)) as client:
                client.complete_many(requests)
            with ChatClient(server.base_url, concurrency=16, cache_dir=Path(cache_dir)) as client:
                with timed("cached", seconds):
                    client.complete_many(requests)
            print(f"cached rerun of {args.cached} requests: {client.stats.requests_sent} requests sent (target 0), "
                  f"{client.stats.cache_hits} cache hits, {seconds['cached']:.2f} s (target < 10 s)")


if __name__ == "__main__":
    main()
