"""Issue item 2 (and the data-file half of 5): the CIFAR-10 reader calls nothing a file names;
arrays are rebuilt by haet from (shape, plain numeric dtype, bytes) under a size cap."""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pytest

from haet.core.errors import ConfigError
from haet.data.cifar10 import TEST_FILE, TRAIN_FILES, load_cifar10, safe_load

from .conftest import haet_process


class _Call:
    """Pickles as a call of `fn(*args)`: how an attacker writes a batch file."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _batch(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(n)]}


def _write_dir(root, protocol=2, n=8):
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate(TRAIN_FILES + (TEST_FILE,)):
        batches[name] = _batch(n, i)
        (root / name).write_bytes(pickle.dumps(batches[name], protocol=protocol))
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_real_numpy_pickles_are_read_exactly(tmp_path, protocol):
    batches = _write_dir(tmp_path, protocol)
    d = safe_load(tmp_path / "data_batch_2")
    src = batches["data_batch_2"]
    assert isinstance(d["data"], np.ndarray) and d["data"].dtype == np.uint8 and d["data"].shape == (8, 3072)
    assert np.array_equal(d["data"], src[b"data"]) and d["labels"] == src[b"labels"]
    assert d["filenames"] == src[b"filenames"] and d["batch_label"] == b"training batch"
    assert d["data"].flags.writeable  # a copy haet owns, not a view of the file's bytes
    train, test = load_cifar10(0, str(tmp_path))
    assert len(train) == 40 and len(test) == 8


def test_crafted_object_array_as_a_shape_is_refused_without_a_crash(tmp_path):
    """The demonstrated crash: an object array whose 'pointers' are b'AAAAAAAA', used as the shape
    of another array, made numpy dereference 0x4141414141414141 (SIGSEGV, no message)."""
    _write_dir(tmp_path / "data")
    pointers = _Call(np.ndarray, (1,), np.dtype("O"), b"AAAAAAAA")
    evil = {**_batch(8), b"data": _Call(np.ndarray, pointers, np.dtype("u1"))}
    (tmp_path / "data" / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))
    proc = haet_process(["train", "--task", "cifar10", "--data-dir", tmp_path / "data", "--epochs", "1",
                         "--out", tmp_path / "run", "--quiet"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, err)
    assert "data_batch_1 is not a CIFAR-10 python batch" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", ["O", [("a", "u1"), ("b", "f4")], "U4", "V8", "M8[s]", ("u1", (4,))])
def test_arrays_of_non_numeric_dtypes_are_refused(tmp_path, dtype):
    _write_dir(tmp_path)
    # a subarray dtype cannot be an array's own dtype (numpy folds it into the shape): pickle the dtype
    arr = np.dtype(dtype) if isinstance(dtype, tuple) else np.zeros(4, dtype=np.dtype(dtype))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({**_batch(8), b"data": arr}, protocol=2))
    with pytest.raises(ConfigError, match="test_batch is not a CIFAR-10 python batch: refused"):
        load_cifar10(0, str(tmp_path))


def test_a_32_kb_file_cannot_ask_for_14_gib(tmp_path):
    _write_dir(tmp_path)
    huge = _Call(np.ndarray, (14 * 2**30 // 3072, 3072), np.dtype("u1"))
    blob = pickle.dumps({b"data": huge, b"labels": [], b"filenames": [b"x" * 32000]}, protocol=2)
    assert len(blob) < 33_000
    (tmp_path / "data_batch_4").write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="data_batch_4 is not a CIFAR-10 python batch: refused"):
            load_cifar10(0, str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # nothing near the 14 GiB the file asked for was allocated


def test_an_array_whose_shape_does_not_match_its_bytes_is_refused(tmp_path):
    _write_dir(tmp_path)
    blob = bytearray(pickle.dumps({**_batch(8)}, protocol=2))
    # Same pickle with the shape (8, 3072) rewritten to (9, 3072): the bytes no longer match it.
    i = blob.index(b"K\x08M\x00\x0c\x86")
    blob[i + 1] = 9
    (tmp_path / "test_batch").write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="test_batch is not a CIFAR-10 python batch: refused .*holds 24576 bytes, not 27648"):
        load_cifar10(0, str(tmp_path))


def test_memory_error_from_a_data_file_is_a_clear_error(tmp_path):
    _write_dir(tmp_path)
    (tmp_path / "data_batch_5").write_bytes(pickle.dumps({**_batch(8), b"data": _Call(np.ndarray, (2**44,))},
                                                         protocol=2))
    with pytest.raises(ConfigError, match="data_batch_5 is not a CIFAR-10 python batch"):
        load_cifar10(0, str(tmp_path))


def test_data_dir_naming_the_downloaded_archive_says_to_extract_it(tmp_path, capsys):
    from .conftest import run

    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00")
    code, _, err = run(["train", "--task", "cifar10", "--data-dir", archive, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "is the downloaded archive, not a directory: extract it first" in err and "tar xzf" in err
