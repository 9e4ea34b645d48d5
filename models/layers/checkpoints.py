"""Loading the state dicts that face-analysis projects publish (face.evoLVe, POSTER, POSTER++) into our modules by
their own parameter names, exactly: a file that does not fit is a one-line ConfigError naming the keys that differ,
never a silent partial load (POSTER++'s own loader keeps whatever happens to match and discards the rest)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from affectprep.config import ConfigError

DATA_PARALLEL_PREFIX = "module."


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


def load_exactly(module: nn.Module, state: dict[str, Tensor], path: Path | str, what: str) -> None:
    """Load `state` into `module` with no missing, unexpected or differently shaped key; else a one-line
    ConfigError that names them."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    problems = [f"{label} {_few(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                            ("with other shapes", shapes)) if keys]
    if problems:
        raise ConfigError(f"{path} is not a {what} checkpoint this model can load: keys " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _few(keys: Iterable[str], shown: int = 4) -> str:
    keys = list(keys)
    listed = ", ".join(keys[:shown])
    return f"{listed} and {len(keys) - shown} more" if len(keys) > shown else listed
