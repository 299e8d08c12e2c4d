"""The composition matrix: which pairs of methods run together and which are refused, and why.

Builds a Trainer for every pair of registered methods (construction only: capability and
compatibility checks, no training) and prints a Markdown matrix plus the refusal reasons. That the
accepted pairs really show both effects is asserted by tests/methods/test_pairs.py.

    python benchmarks/pairs.py > docs/composition-matrix.md
"""

from __future__ import annotations

import itertools
import warnings

import torch

import haet
from haet.core.errors import ConfigError
from haet.data import TensorData
from haet.methods import parse_entry, registry
from haet.models import build_model

VARIANTS = {"fusion:mode=forward": "fusion"}
MODEL = {"eqprop": "eqprop-mlp"}  # methods that need a model of their own kind (as in the test)


def main() -> None:
    names = list(registry()) + list(VARIANTS)
    data = TensorData(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    cell: dict[tuple[str, str], str] = {}
    reasons: list[tuple[str, str, str]] = []
    for a, b in itertools.combinations(names, 2):
        if VARIANTS.get(a, a) == VARIANTS.get(b, b):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = next((MODEL[n] for n in (a, b) if n in MODEL), "mnist5k-cnn")
                haet.Trainer(build_model(model, (1, 28, 28), 10), data, methods=parse_entry(f"{a}+{b}"),
                             progress=False)
            cell[a, b] = cell[b, a] = "✓"
        except ConfigError as err:
            cell[a, b] = cell[b, a] = "✗"
            reasons.append((a, b, str(err)))
    print(f"haet {haet.__version__}: ✓ runs with both effects (tests/methods/test_pairs.py), ✗ refused at construction; "
          "pairs with eqprop on eqprop-mlp, the others on mnist5k-cnn\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for a in names:
        print(f"| **{a}** | " + " | ".join("·" if a == b else cell.get((a, b), "–") for b in names) + " |")
    print("\nRefusals:\n")
    for a, b, why in reasons:
        print(f"- `{a}` + `{b}`: {why}")


if __name__ == "__main__":
    main()
