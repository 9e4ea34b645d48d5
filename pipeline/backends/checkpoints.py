"""What pins a model checkpoint's weights, for cache keys: every stage with a Hugging Face backend puts it in its
identity, so new weights under the same name give a new store key."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from affectprep.hub import not_cached_message, offline_if_unreachable

from ..stage import file_digest


def checkpoint_identity(model: str, revision: str | None = None) -> dict[str, str]:
    """What pins a checkpoint's weights, for cache keys, without loading it.

    A local folder: its name and the sha256 of its weight files (safetensors, else PyTorch .bin). A hub id: the id
    and the commit its revision resolves to (from the local cache when offline).
    """
    folder = Path(model)
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in {folder}")
        digest = hashlib.sha256()
        for file in files:
            stat = file.stat()
            digest.update(f"{file.name}:{_cached_digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns)}\n"
                          .encode())
        return {"model": folder.resolve().name, "weights_sha256": digest.hexdigest()}
    offline = offline_if_unreachable()   # before transformers asks the hub, with its 24 s of retries
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    try:
        config_file = cached_file(model, "config.json", revision=revision)
    except OSError:
        if offline:
            raise OSError(not_cached_message(model)) from None
        raise
    commit = extract_commit_hash(config_file, None)
    if commit is None:
        raise OSError(f"cannot tell which commit of {model!r} (revision {revision or 'main'}) is in use")
    return {"model": model, "revision": commit}


@functools.lru_cache(maxsize=64)
def _cached_digest(path: str, size: int, mtime_ns: int) -> str:
    # Hashing a 7B checkpoint takes tens of seconds: once per file version (size and mtime in the key) is enough.
    return file_digest(Path(path))
