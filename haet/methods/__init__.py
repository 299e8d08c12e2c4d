"""Methods and their registry.

Every module in this package is a method (or a tight pair): a functional form usable without the
Trainer and a thin `haet.Method` subclass with a ``name`` from the table in DESIGN.md. Modules are
found automatically; a subclass with a non-empty ``name`` is registered under it.

Command-line specs: ``name`` or ``name:k=v,k=v``; several methods in one run are joined with
``+`` (``gradmatch:fraction=0.3+fusion``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from ..core.config import parse_params
from ..core.errors import ConfigError
from ..core.method import Method

#: The command-line names of DESIGN.md, in its order, with the paper each comes from.
PLANNED: dict[str, str] = {
    "gradmatch": "GRAD-MATCH subset selection (Killamsetty et al.)",
    "random_subset": "adaptive random subset (GRAD-MATCH's baseline)",
    "downsample": "input and kernel downsampling",
    "fusion": "optimizer fusion, backward or forward",
    "sc_sgd": "momentum SGD on dynamic stochastic computing",
    "qat": "fully quantized fixed-point training",
    "binary_penalty": "exact-penalty binary training",
    "binary_connect": "straight-through binary baseline (BinaryConnect)",
    "gsp": "grouped sparse projection",
    "mbst": "memory-bounded sparse training",
    "gradmax": "GradMax network growth",
    "tensor_train": "rank-adaptive low-precision tensor-train layers",
}

_REGISTRY: dict[str, type[Method]] | None = None


def registry() -> dict[str, type[Method]]:
    """name -> Method subclass, for every method that exists, in DESIGN.md's order."""
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, type[Method]] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, Method) and obj.name and obj.__module__ == module.__name__:
                    if obj.name in found and found[obj.name] is not obj:
                        raise RuntimeError(f"two methods are named {obj.name!r}")
                    found[obj.name] = obj
        order = list(PLANNED) + sorted(set(found) - set(PLANNED))
        _REGISTRY = {name: found[name] for name in order if name in found}
    return _REGISTRY


def get_method_class(name: str) -> type[Method]:
    reg = registry()
    if name in reg:
        return reg[name]
    available = ", ".join(reg) or "(none yet)"
    if name == "baseline":
        raise ConfigError("'baseline' means no method: use it in bench --methods; for train, omit --method")
    if name in PLANNED:
        raise ConfigError(f"method {name!r} ({PLANNED[name]}) is not implemented yet; available: {available}")
    raise ConfigError(f"unknown method {name!r}; choose one of: {available}")


def parse_method(spec: str) -> Method:
    """Build a method from ``name`` or ``name:k=v,k=v``."""
    name, _, rest = spec.strip().partition(":")
    cls = get_method_class(name.strip())
    raw: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad parameter {item!r} for method {name}; write {name}:key=value,key=value")
        if key.strip() in raw:
            raise ConfigError(f"parameter {key.strip()!r} given twice for method {name}")
        raw[key.strip()] = value.strip()
    if cls.config_class is None:
        if raw:
            raise ConfigError(f"method {name} takes no parameters, got {', '.join(raw)}")
        return cls()
    return cls(parse_params(cls.config_class, raw, owner=name))


def parse_entry(entry: str) -> list[Method]:
    """One run's methods: specs joined by ``+``; ``baseline`` alone means none."""
    entry = entry.strip()
    if entry == "baseline":
        return []
    methods = [parse_method(s) for s in entry.split("+")]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"a method appears twice in {entry!r}")
    return methods


def split_entries(text: str) -> list[str]:
    """Split ``baseline,gradmatch:fraction=0.3,select_every=2,downsample`` into runs.

    Items with ``=`` are parameters of the method before them; ``all`` expands to the baseline and
    every registered method with its defaults.
    """
    entries: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        head = item.split("=", 1)[0]
        if "=" in item and ":" not in head and "+" not in head:  # a parameter of the entry before
            if not entries:
                raise ConfigError(f"parameter {item!r} comes before any method name")
            entries[-1] += "," + item
        elif item == "all":
            entries += ["baseline", *registry()]
        else:
            entries.append(item)
    if not entries:
        raise ConfigError("no methods given; e.g. --methods baseline,NAME[:k=v]")
    return list(dict.fromkeys(entries))  # drop repeats, keep order
