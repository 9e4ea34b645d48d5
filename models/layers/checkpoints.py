"""Loading the state dicts that public projects release (face.evoLVe, POSTER, POSTER++, MAE-DFER, VideoCLIP) into
our modules by their own parameter names, exactly: a file that does not fit is a one-line ConfigError naming the keys
that differ, never a silent partial load (POSTER++'s own loader keeps whatever happens to match and discards the rest).

Training checkpoints pickle more than tensors: MAE-DFER (VideoMAE's `utils.save_model`) stores {"model": state dict,
"optimizer", "epoch", "scaler", "args": argparse.Namespace}; fairseq (VideoCLIP) {"model", "args", "cfg", ...}.
`read_checkpoint` unpickles with weights_only=True allowing argparse.Namespace only, so a file cannot run code on
load; any other object is a one-line ConfigError saying how to extract the state dict from a file one trusts."""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from affectprep.config import ConfigError

DATA_PARALLEL_PREFIX = "module."
# Where training checkpoints nest their state dict (MAE-DFER's fine-tuning reads "model|module"; fairseq "model").
STATE_DICT_KEYS = ("model", "module", "state_dict")


def read_state_dict(path: Path | str, what: str) -> dict[str, Tensor]:
    """The tensors of a `torch.save`d checkpoint: a bare state dict or one under "state_dict" (the .pth.tar
    releases), with nn.DataParallel's "module." prefix removed. Only tensors and plain containers are unpickled."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a zip, pickle or format error: this is not a tensor checkpoint we can read safely
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not a PyTorch checkpoint of the {what} ({reason[:200]})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no state dict of tensors (the {what} checkpoint is a dict of parameter "
                          f"name -> tensor, or one under 'state_dict')")
    return {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in state.items()}


def read_checkpoint(path: Path | str, what: str) -> dict[str, Any]:
    """A training checkpoint (a dict, arguments and all) loaded on the CPU with weights_only=True, argparse.Namespace
    allowed (MAE-DFER and fairseq save their training arguments as one)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if blocked is None:
            raise ConfigError(f"{path} is not a PyTorch checkpoint of the {what} (it does not unpickle)") from None
        raise ConfigError(
            f"{what} {path} holds Python objects besides tensors ({blocked.group(1)}); if you trust the file, save "
            f"its state dict alone with python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save(c.get('model', c), 'state.pth')\" and point the option at state.pth") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ConfigError(f"{path} is not a PyTorch checkpoint of the {what} ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{what} {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def nested_state_dict(checkpoint: dict[str, Any], path: Path | str, what: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint's state dict: under the first of STATE_DICT_KEYS it has, else the dict itself."""
    state = next((checkpoint[k] for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ConfigError(f"{what} {path} holds no tensors (top-level keys: {_few(checkpoint)})")
    return tensors


def split_keys(state: dict[str, Tensor], ignored: Callable[[str], bool]) -> tuple[dict[str, Tensor], list[str]]:
    """(the entries to load, the sorted names left out because `ignored` says so)."""
    kept = {k: v for k, v in state.items() if not ignored(k)}
    return kept, sorted(set(state) - set(kept))


def load_exactly(module: nn.Module, state: dict[str, Tensor], path: Path | str, what: str) -> None:
    """Load `state` into `module` with no missing, unexpected or differently shaped key; else a one-line
    ConfigError that names them."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})"
                    for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    problems = [f"{label} {_few(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                            ("with other shapes", shapes)) if keys]
    if problems:
        raise ConfigError(f"{path} is not a {what} checkpoint this model can load: keys " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _few(keys: Iterable[str], shown: int = 4) -> str:
    keys = list(keys)
    listed = ", ".join(keys[:shown])
    return f"{listed} and {len(keys) - shown} more" if len(keys) > shown else listed
