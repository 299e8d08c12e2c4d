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
from importlib.metadata import entry_points

from ..core.config import parse_kv, parse_params
from ..core.errors import ConfigError
from ..core.method import Method

#: The order `haet methods` lists haet's own methods in (DESIGN.md's table); others follow by name.
ORDER = ("gradmatch", "random_subset", "downsample", "fusion", "sc_sgd", "qat", "binary_penalty", "binary_connect",
         "gsp", "mbst", "gradmax", "tensor_train", "eqprop")

_BUILTIN: dict[str, type[Method]] | None = None
_USER: dict[str, type[Method]] = {}
ENTRY_POINT_GROUP = "haet.methods"


def register_method(cls: type[Method]) -> type[Method]:
    """Make a user's `Method` subclass available by its ``name`` to ``haet train --method``,
    ``haet bench --methods`` and ``haet methods``, without editing haet. Usable as a decorator.
    Packages can also declare it as an entry point in the ``haet.methods`` group."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"register_method expects a haet.Method subclass, got {cls!r}")
    if not cls.name or not cls.name.replace("_", "").isalnum() or not cls.name[0].isalpha():
        raise ConfigError(f"a method's name must be letters, digits and _, starting with a letter; got {cls.name!r}")
    if cls.name == "baseline":
        raise ConfigError("'baseline' is reserved (it means no method)")
    current = registry().get(cls.name)
    if current is not None and current is not cls:
        raise ConfigError(f"a method named {cls.name!r} is already registered ({current.__module__}.{current.__name__})")
    _USER[cls.name] = cls
    return cls


def _builtin() -> dict[str, type[Method]]:
    global _BUILTIN
    if _BUILTIN is None:
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
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Method) and obj.name and obj.name not in found:
                found[obj.name] = obj
        order = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
        _BUILTIN = {name: found[name] for name in order}
    return _BUILTIN


def registry() -> dict[str, type[Method]]:
    """name -> Method subclass: haet's methods, those of installed packages' entry points, and
    those registered with `register_method`."""
    return {**_builtin(), **_USER}


def get_method_class(name: str) -> type[Method]:
    reg = registry()
    if name in reg:
        return reg[name]
    available = ", ".join(reg) or "(none yet)"
    if name == "baseline":
        raise ConfigError("'baseline' means no method: use it in bench --methods; for train, omit --method")
    raise ConfigError(f"unknown method {name!r}; choose one of: {available}")


def parse_method(spec: str) -> Method:
    """Build a method from ``name`` or ``name:k=v,k=v``."""
    name, _, rest = spec.strip().partition(":")
    cls = get_method_class(name.strip())
    raw = parse_kv(rest, f"method {name.strip()}")
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
