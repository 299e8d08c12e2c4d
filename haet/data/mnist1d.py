"""mnist1d's signals, generated offline from the templates the package ships (never its download
path), shared by the mnist1d and mnist1d-seq tasks."""

from __future__ import annotations

import functools
import random

import numpy as np


@functools.lru_cache(maxsize=1)
def mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, x_test, y_test) of mnist1d's own 4,000 / 1,000 split."""
    from mnist1d.data import get_dataset_args, make_dataset

    saved, saved_py = np.random.get_state(), random.getstate()  # make_dataset reseeds both
    try:
        d = make_dataset(get_dataset_args())  # generated offline from the bundled templates
    finally:
        np.random.set_state(saved)
        random.setstate(saved_py)
    return d["x"], d["y"], d["x_test"], d["y_test"]
