"""The HAET 2021 challenge's own data: the first 10 classes of mini-ImageNet at 32×32, 500 train and
100 test images per class, from files the user provides (nothing is downloaded, nothing unpickled).

Two layouts are read from ``--data-dir``:

- numpy arrays: ``train_x.npy`` (N, 32, 32, 3) or (N, 3, 32, 32), uint8 0-255 or float 0-1,
  ``train_y.npy`` (N,) integer labels 0-9, and the same for ``test_``; loaded with
  ``allow_pickle=False``;
- image folders: ``train/<class>/*.png`` and ``test/<class>/*.png`` (classes sorted by name give
  labels 0-9), read with matplotlib's PNG reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError
from ..data.loader import TensorData
from ..data.tasks import Task

SIZE, CLASSES = 32, 10


def _images(x: np.ndarray, where: str) -> torch.Tensor:
    if x.ndim != 4 or (x.shape[-1] != 3 and x.shape[1] != 3):
        raise ConfigError(f"{where}: images must be (N, 32, 32, 3) or (N, 3, 32, 32), got shape {x.shape}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.transpose(0, 3, 1, 2)
    if x.shape[2:] != (SIZE, SIZE):
        raise ConfigError(f"{where}: images must be 32×32, got {x.shape[2]}×{x.shape[3]}")
    x = x.astype(np.float32)
    if x.max(initial=0) > 1.0:
        x = x / 255.0
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() >= CLASSES)):
        raise ConfigError(f"{where}: labels must be {n} integers in 0..9, got shape {y.shape} dtype {y.dtype}")
    return torch.from_numpy(y.astype(np.int64))


def _from_arrays(root: Path, split: str) -> TensorData:
    def load(name: str) -> np.ndarray:
        try:
            return np.load(root / f"{split}_{name}.npy", allow_pickle=False)
        except ValueError as err:  # an object array: refused rather than unpickled
            raise ConfigError(f"{root / f'{split}_{name}.npy'}: {err}") from None

    x = _images(load("x"), f"{split}_x.npy")
    return TensorData(x, _labels(load("y"), len(x), f"{split}_y.npy"))


def _from_folders(root: Path, split: str) -> TensorData:
    import matplotlib.image as mpimg

    classes = sorted(p for p in (root / split).iterdir() if p.is_dir())
    if len(classes) != CLASSES:
        raise ConfigError(f"{root / split}: expected {CLASSES} class folders, found {len(classes)}")
    xs, ys = [], []
    for label, folder in enumerate(classes):
        for path in sorted(folder.glob("*.png")):
            img = np.asarray(mpimg.imread(path), dtype=np.float32)  # PNG: floats in 0..1
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            xs.append(img[..., :3])
            ys.append(label)
    if not xs:
        raise ConfigError(f"{root / split}: no .png images in the class folders")
    x = _images(np.stack(xs), f"{root / split}")
    return TensorData(x, torch.tensor(ys, dtype=torch.long))


def load_mini_imagenet10(seed: int, data_dir: str | None = None) -> tuple[TensorData, TensorData]:
    """(train, test) of the challenge's mini-ImageNet-10 from `data_dir` (see the module docstring)."""
    if not data_dir:
        raise ConfigError("task mini-imagenet10 needs --data-dir with train_x.npy/train_y.npy/test_x.npy/"
                          "test_y.npy or train/<class>/*.png and test/<class>/*.png")
    root = Path(data_dir)
    if (root / "train_x.npy").is_file():
        loaded = _from_arrays(root, "train"), _from_arrays(root, "test")
    elif (root / "train").is_dir() and (root / "test").is_dir():
        loaded = _from_folders(root, "train"), _from_folders(root, "test")
    else:
        raise ConfigError(f"{root}: neither train_x.npy nor train/ and test/ image folders found")
    # Normalize with the training split's per-channel statistics (the test split is never read for this).
    train, test = loaded
    mean = train.x.mean(dim=(0, 2, 3), keepdim=True)
    std = train.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return TensorData((train.x - mean) / std, train.y), TensorData((test.x - mean) / std, test.y)


MINI_IMAGENET10 = Task(
    "mini-imagenet10", "the HAET 2021 challenge data: first 10 classes of mini-ImageNet, 32×32, 500/100 per class "
    "(--data-dir: .npy arrays or PNG folders)", load_mini_imagenet10, (3, SIZE, SIZE), CLASSES, "resnet8",
    ("resnet8", "mlp"), "user-provided files", needs_data_dir=True)
