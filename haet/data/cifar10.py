"""CIFAR-10 from its python-pickle batches, read without running anything in the files.

The user downloads ``cifar-10-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html),
extracts it, and names the directory with ``--data-dir``. The batches are pickles of a dict
(``batch_label`` bytes, ``labels`` a list of ints, ``data`` a uint8 array 10000 × 3072,
``filenames`` a list of bytes). They are read through `SafeUnpickler`, which calls nothing that
the file names: the few globals the format needs (numpy's ``_reconstruct``, ``_frombuffer``,
``ndarray``, ``dtype`` and, for bytes written by Python 3 at protocol 2, ``_codecs.encode``) are
replaced by inert stand-ins that only record their arguments. An array is then rebuilt by haet
from (shape, dtype, raw bytes) after checking that the dtype is a plain numeric one (no object,
structured, subarray or user dtype), the shape small non-negative integers whose product matches
the byte count, and the size under `MAX_ARRAY_BYTES`. A file that asks for anything else is
refused with an error naming it (exit 2), and nothing in it runs.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from ..core import files
from ..core.errors import ConfigError
from .loader import TensorData

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# Per-channel mean and std of the CIFAR-10 training set.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
MAX_FILE_BYTES = 256 * 2**20    # a real batch is 31 MB
MAX_ARRAY_BYTES = 64 * 2**20    # one batch's images: 10000 × 3072 bytes = 29 MiB
MAX_DIMS = 4
#: Plain numeric dtypes (numpy type codes without byte order) an array in a batch may have.
NUMERIC_CODES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"}


def _refuse(what: str):
    return pickle.UnpicklingError(f"refused {what}: not part of the CIFAR-10 format")


class _Dtype:
    """Stands in for ``numpy.dtype(code, align, copy)``; checked when its state arrives."""

    def __init__(self, code, align=False, copy=True) -> None:
        if not isinstance(code, str) or code.lstrip("<>|=") not in NUMERIC_CODES:
            raise _refuse(f"dtype {str(code)[:20]!r} (only plain numeric dtypes are read)")
        self.code, self.order = code, "|"

    def __setstate__(self, state) -> None:
        # numpy's state of a plain dtype: (3, byte order, None, None, None, -1, -1, 0)
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0)):
            raise _refuse("a dtype with fields, subarrays or flags")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.code.lstrip("<>|="))
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


class _Array:
    """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``; the array is
    rebuilt by `_build` from the state numpy pickles: (1, shape, dtype, is_fortran, raw bytes)."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _refuse("an array state that is not (version, shape, dtype, order, bytes)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(fortran, bool):
            raise _refuse("an array order that is not a bool")
        self.array = _build(raw, dtype, shape, "F" if fortran else "C")


class _NdarrayMarker:
    """What ``numpy.ndarray`` stands for: a marker for `_reconstruct`, never called."""

    def __call__(self, *args, **kwargs):
        raise _refuse("a call of numpy.ndarray with the file's arguments")


_NDARRAY = _NdarrayMarker()


def _reconstruct(cls, shape, typecode) -> _Array:
    if cls is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise _refuse("an array construction other than numpy's own pickling")
    return _Array()


def _frombuffer(buf, dtype, shape, order) -> np.ndarray:
    """Stands in for ``numpy.core.numeric._frombuffer`` (pickle protocol 5)."""
    if order not in ("C", "F"):
        raise _refuse(f"array order {str(order)[:5]!r}")
    return _build(buf, dtype, shape, order)


def _build(raw, dtype, shape, order: str) -> np.ndarray:
    """An array from (raw bytes, plain numeric dtype, shape), each checked; a copy haet owns."""
    if not isinstance(raw, (bytes, bytearray)):
        raise _refuse("array data that is not bytes")
    if not isinstance(dtype, _Dtype):
        raise _refuse("an array without a plain numeric dtype")
    if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS
            and all(type(n) is int and 0 <= n <= 2**31 for n in shape)):
        raise _refuse(f"array shape {str(shape)[:40]} (at most {MAX_DIMS} non-negative integers)")
    dt = dtype.numpy()
    size = math.prod(shape) * dt.itemsize
    if size > MAX_ARRAY_BYTES:
        raise _refuse(f"an array of {size} bytes (at most {MAX_ARRAY_BYTES})")
    if size != len(raw):
        raise _refuse(f"an array of shape {shape} and {dt} whose data holds {len(raw)} bytes, not {size}")
    return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order=order).copy()


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 use to rebuild bytes; latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to decode bytes with {str(encoding)[:20]!r}")
    return text.encode("latin1")


_STAND_INS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numeric arrays; no global the file names is ever called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _STAND_INS:
            return _STAND_INS[(module, name)]
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of the CIFAR-10 format")


def safe_load(path: Path) -> dict:
    raw = files.read_bytes(path, MAX_FILE_BYTES, follow=True, what="CIFAR-10 batch")
    try:
        data = _materialize(SafeUnpickler(io.BytesIO(raw), encoding="bytes").load())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, OverflowError, RecursionError, MemoryError) as err:
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: {str(err)[:300]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: expected a dict, got {type(data).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _materialize(x, depth: int = 0):
    """The loaded structure with every stand-in replaced by its array; anything else refused."""
    if depth > 8:
        raise _refuse("nesting deeper than 8 levels")
    if isinstance(x, _Array):
        if x.array is None:
            raise _refuse("an array without data")
        return x.array
    if isinstance(x, np.ndarray) or x is None or isinstance(x, (bool, int, float, str, bytes)):
        return x
    if isinstance(x, dict):
        return {_materialize(k, depth + 1): _materialize(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_materialize(v, depth + 1) for v in x)
    raise _refuse(f"an object of type {type(x).__name__}")


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
        what = "the downloaded archive" if root.name.endswith((".tar.gz", ".tgz", ".tar")) else "a file"
        raise ConfigError(f"--data-dir {root} is {what}, not a directory: extract it first "
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
