"""Issue item 9: the same --seed gives the same weights in every process, whatever PYTHONHASHSEED
(gradmax built its modules while iterating a set of names)."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT

SCRIPT = """
import hashlib, torch
import haet
from haet.data import get_task
from haet.methods import parse_entry
from haet.models import build_model
torch.set_num_threads(1)
task = get_task("digits")
train, test = task.load(0, None)
haet.seed_everything(0)
model = build_model("mlp", task.input_shape, task.num_classes)
trainer = haet.Trainer(model, train, test, methods=parse_entry("gradmax:grow_every=2,grow_until=6"),
                       budget=haet.Budget(steps=8), device="cpu", seed=0, progress=False)
trainer.fit(1)
h = hashlib.sha256()
for name, tensor in model.state_dict().items():
    h.update(name.encode()); h.update(tensor.numpy().tobytes())
print(h.hexdigest())
"""


def _weights_digest(hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_gradmax_weights_do_not_depend_on_the_hash_seed():
    digests = {_weights_digest(seed) for seed in ("1", "2", "3")}
    assert len(digests) == 1
