"""Hugging Face hub ids on a machine that cannot reach the hub (a cluster's compute nodes, an air-gapped server).

huggingface_hub asks the hub about every id before it looks in its cache, and when the hub cannot be reached it
retries five times with back-off: 24 seconds and ten lines of warnings per lookup, per worker, before the model
loads from the cache anyway (or fails). `offline_if_unreachable()` tries one TCP connection to the hub first; when
that fails it switches this process, and the Dask workers it starts afterwards (they inherit the environment), to
huggingface_hub's offline mode, so a cached id loads at once and a missing one fails at once.
"""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 3.0


@lru_cache(maxsize=1)
def offline_if_unreachable() -> bool:
    """Whether hub ids resolve from the local cache only: offline mode was asked for (HF_HUB_OFFLINE), or the hub
    (HF_ENDPOINT) did not accept a connection within PROBE_SECONDS, which turns offline mode on. Once per process."""
    if any(_true(os.environ.get(name)) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=PROBE_SECONDS).close()
        return False
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:   # huggingface_hub read the variable when it was imported: tell the module as well
        import huggingface_hub.constants as constants
        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return True


def not_cached_message(model: str) -> str:
    """One line for a hub id that is not in the cache of a machine without the hub."""
    return (f"{model!r} is neither a local folder nor in this machine's Hugging Face cache, and the hub cannot be "
            f"reached from here: download it where there is a network (`hf download {model}`) and copy the cache "
            f"(HF_HOME) here, or give the path of a local folder")


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
