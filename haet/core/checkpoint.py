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
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import files
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
    """Write atomically through a fresh temporary, never through a symlink (`haet.core.files`):
    a failed write (a full disk) leaves the previous checkpoint as it was."""
    return files.atomic_write(Path(path), lambda f: torch.save({"format": FORMAT, **payload}, f))


def load(path: str | os.PathLike, epochs: int | None = None) -> dict:
    """The checkpoint at `path` (a file or a run folder), its contents checked (`check`); any
    problem is a ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"no checkpoint at {path} (was the run started with --checkpoint?)")
    with files.open_regular(path, what="checkpoint") as f:
        _check_integrity(f, path)
        try:
            payload = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ConfigError(f"refused to load {path}: it needs more than tensors and plain data "
                              f"({str(err).splitlines()[0][:200]})") from None
        except MemoryError:
            raise ConfigError(f"{path} is not a readable haet checkpoint (it asks for more memory than there is)") from None
        except Exception as err:  # a text file, flipped bits: torch raises many kinds; all mean "not a checkpoint"
            raise ConfigError(f"{path} is not a readable haet checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    check(payload, path, epochs)
    return payload


def _check_integrity(f, path: Path) -> None:
    """A checkpoint is a zip archive whose members carry CRC-32s: flipped bits are found here,
    before torch reads a damaged header or, worse, damaged weights without a word."""
    if not zipfile.is_zipfile(f):
        f.seek(0)
        return  # not an archive: torch.load (weights_only) refuses it or reads the legacy format safely
    try:
        with zipfile.ZipFile(f) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ConfigError(f"{path} is not a readable haet checkpoint (a damaged zip archive: {err})") from None
    if damaged is not None:
        raise ConfigError(f"{path} is damaged: its member {damaged} fails the CRC check")
    f.seek(0)


def check(payload: Any, path: Path, epochs: int | None = None) -> None:
    """Refuse a payload whose fields have the wrong types or whose epoch is outside 0..`epochs`."""
    def bad(what: str):
        return ConfigError(f"{path} is not a valid haet checkpoint: {what}")

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a haet checkpoint of format {FORMAT}")
    for key, kinds in _FIELDS.items():
        if key not in payload:
            raise bad(f"{key!r} is missing")
        if not isinstance(payload[key], kinds) or isinstance(payload[key], bool) and bool not in kinds:
            raise bad(f"{key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {type(payload[key]).__name__}")
    for key in ("epoch", "step", "samples_seen", "model_version"):
        if payload[key] < 0:
            raise bad(f"{key!r} is negative ({payload[key]})")
    if epochs is not None and payload["epoch"] > epochs:
        raise ConfigError(f"{path} already holds {payload['epoch']} trained epochs; --epochs {epochs} is fewer "
                          f"(with --resume, --epochs is the total: give at least {payload['epoch']})")
    if not all(isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
               for k, v in payload["model"].items()):
        raise bad("'model' must map parameter names to tensors")
    opt = payload["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise bad("'optimizer' must hold 'state' and 'param_groups'")
    if not all(isinstance(m, dict) for m in payload["methods"]) or \
            not all(isinstance(v, dict) for v in payload["meters"].values()):
        raise bad("'methods' and 'meters' must hold one state dict each")
    if not all(isinstance(h, dict) for h in payload["history"]) or len(payload["history"]) > payload["epoch"]:
        raise bad("'history' must be one object per trained epoch")
    rng = payload["rng"]
    numpy_state, python_state = rng.get("numpy"), rng.get("python")
    if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8 \
            or not isinstance(numpy_state, list) or len(numpy_state) != 5 \
            or not isinstance(numpy_state[1], torch.Tensor) or not isinstance(python_state, list) \
            or len(python_state) != 3 or not isinstance(python_state[1], list):
        raise bad("'rng' does not hold the random states haet saves")


_FIELDS: dict[str, tuple] = {
    "epoch": (int,), "step": (int,), "samples_seen": (int,), "model_version": (int,),
    "compute_dtype": (str, type(None), torch.dtype), "model": (dict,), "optimizer": (dict,), "methods": (list,),
    "meters": (dict,), "clock": (dict,), "rng": (dict,), "history": (list,),
}


def _to_lists(x):
    if isinstance(x, tuple):
        return [_to_lists(v) for v in x]
    return x
