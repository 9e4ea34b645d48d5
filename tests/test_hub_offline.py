"""Hub ids on a machine that cannot reach the hub: a cached id loads at once from the cache, a missing one fails
at once in one line, and neither waits on huggingface_hub's retries (affectprep/hub.py). The hub is a closed port
on 127.0.0.1, so the test behaves the same with or without a network."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import tiny_models

COMMIT = "0123456789abcdef0123456789abcdef01234567"

LOAD = r"""
import json, sys
from affectprep.pipeline.backends.checkpoints import checkpoint_identity
from affectprep.pipeline.backends.rewriter_t5 import T5Rewriter
out = {"identity": checkpoint_identity("affectprep-tests/tiny-t5")}
out["texts"] = T5Rewriter("affectprep-tests/tiny-t5", max_new_tokens=4).rewrite_batch(["a clip"])
try:
    checkpoint_identity("affectprep-tests/not-downloaded")
except OSError as e:
    out["missing"] = str(e)
print(json.dumps(out))
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cached_hub_id_loads_and_a_missing_one_fails_at_once_without_the_hub(tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--affectprep-tests--tiny-t5"
    tiny_models.save_t5(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    out = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["identity"] == {"model": "affectprep-tests/tiny-t5", "revision": COMMIT}
    assert len(result["texts"]) == 1
    assert "not-downloaded" in result["missing"] and "hf download" in result["missing"]
    assert "\n" not in result["missing"]
    assert "Retrying" not in out.stderr, "huggingface_hub retried a hub it cannot reach (24 s a lookup)"
