"""CIFAR-10 from its python-pickle batches, read without running anything in the files.

The user downloads ``cifar-10-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html),
extracts it, and names the directory with ``--data-dir``. The batches are pickles; they are read
through `SafeUnpickler`, which admits only what the format holds (dicts, lists, strings, bytes,
numbers and numpy arrays with their dtypes; bytes written by Python 3 at protocol 2 are rebuilt
by a latin-1-only decoder). A file that asks for anything else is refused with
an error naming it, and nothing in it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError
from .loader import TensorData

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# Per-channel mean and std of the CIFAR-10 training set.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 use to rebuild bytes; latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to decode bytes with {encoding!r}")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of the CIFAR-10 format")


def safe_load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, OverflowError) as err:
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: expected a dict, got {type(data).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one batch file, checked."""
    d = safe_load(path)
    if "data" not in d or "labels" not in d:
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: keys 'data' and 'labels' are required, "
                          f"found {sorted(map(str, d))}")
    x, y = d["data"], np.asarray(d["labels"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ConfigError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), "
                          f"got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise ConfigError(f"{path}: 'labels' must be {len(x)} integers in 0..9")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def find_dir(data_dir: str | None) -> Path:
    if not data_dir:
        raise ConfigError(f"task cifar10 needs --data-dir: download {URL}, extract it, and pass the "
                          "directory that holds data_batch_1..5 and test_batch")
    root = Path(data_dir).expanduser()
    for cand in (root, root / "cifar-10-batches-py"):
        if all((cand / f).is_file() for f in TRAIN_FILES + (TEST_FILE,)):
            return cand
    if root.is_file():
        raise ConfigError(f"--data-dir {root} is a file, not a directory: extract it first "
                          f"(tar xzf {root} -C {root.parent}) and pass --data-dir {root.parent / 'cifar-10-batches-py'}")
    if not root.is_dir():
        raise ConfigError(f"--data-dir {root} does not exist (download {URL} and extract it)")
    missing = [f for f in TRAIN_FILES + (TEST_FILE,) if not (root / f).is_file()]
    raise ConfigError(f"--data-dir {root} lacks CIFAR-10 batch files {', '.join(missing)} "
                      f"(download {URL} and extract it)")


def load_cifar10(seed: int, data_dir: str | None) -> tuple[TensorData, TensorData]:
    root = find_dir(data_dir)
    parts = [read_batch(root / f) for f in TRAIN_FILES]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read_batch(root / TEST_FILE)
    return _to_tensor(xtr, ytr), _to_tensor(xte, yte)


def _to_tensor(x: np.ndarray, y: np.ndarray) -> TensorData:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    xt = (torch.from_numpy(x).float() / 255.0 - mean) / std
    return TensorData(xt.contiguous(), torch.from_numpy(y))
