"""Checkpoints: everything a run needs to continue as if it had never stopped.

Saved at each epoch end (written to a temporary file, then renamed, so a crash never leaves half
a checkpoint): model, optimizer, each method's and meter's state, the clock, the RNG states of
torch (CPU and CUDA), numpy and Python, the history and the step counters. The data order needs
nothing more: epoch e's order is a function of (seed, e). Loaded with
``torch.load(weights_only=True)``: a file that needs anything beyond tensors and plain containers
is refused.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

FORMAT = 1
FILENAME = "checkpoint.pt"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path} (was the run started with --checkpoint?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"refused to load {path}: it needs more than tensors and plain data ({err})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ConfigError(f"{path} is not a readable haet checkpoint ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a haet checkpoint of format {FORMAT}")
    return payload


def _to_lists(x):
    if isinstance(x, tuple):
        return [_to_lists(v) for v in x]
    return x
