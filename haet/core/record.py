"""RunRecord: what a run did and what it cost (``DIR/record.json``, schema version 1).

The schema is a contract (DESIGN.md): fields may be added, none renamed or removed without
bumping ``SCHEMA``. Records are plain JSON, read as data.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import files
from .errors import ConfigError

SCHEMA = 1
RECORD_CAP = 32 * 2**20  # bytes; a record of thousands of epochs is a few MB
MAX_DEPTH = 8            # record -> history -> epoch -> value is 3 deep; method params may nest a little
MAX_TEXT = 4096          # characters of a free-text string (an error message, a CPU name)
#: Names (task, model, label, method, metric keys, stop reasons) are read back into tables and
#: file names: a conservative character set, one line, no markup.
NAME = re.compile(r"[A-Za-z0-9_.:=+,/@ ()\[\]-]{0,200}")


@dataclass
class RunRecord:
    task: str | None = None
    model: str | None = None
    methods: list[dict] = field(default_factory=list)
    label: str = ""  # how the run was asked for: "baseline", "gradmatch:fraction=0.3", "a+b"
    seed: int = 0
    device: str = "cpu"
    hardware: dict = field(default_factory=dict)
    epochs: int = 0
    steps: int = 0
    stopped_by: str = "epochs"
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    method_metrics: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    error: str | None = None
    schema: int = SCHEMA
    haet_version: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        head = {"schema": d.pop("schema"), "haet_version": d.pop("haet_version")}
        return _jsonable({**head, **d})

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``record.json`` into `directory` atomically (a fresh temporary, then rename),
        never through a symlink."""
        path = Path(directory) / "record.json"
        return files.write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "record") -> "RunRecord":
        """A record from JSON data, validated (`check_record`): types, names, nesting and sizes."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} is not a valid record (expected a JSON object)")
        if d.get("schema") != SCHEMA:
            raise ConfigError(f"{source}: record schema {d.get('schema')!r} is not supported "
                              f"(this haet reads schema {SCHEMA})")
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k in known}
        check_record(d, source)
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunRecord":
        path = Path(path)
        if path.is_dir():
            path = path / "record.json"
        return cls.from_dict(files.read_json(path, what="record", cap=RECORD_CAP), str(path))

    @property
    def method_label(self) -> str:
        """The label the run was asked for by, else its method names joined by ``+``."""
        return self.label or "+".join(m["name"] for m in self.methods) or "baseline"


def hardware_info(device: torch.device) -> dict:
    """What the run ran on, for the record."""
    gpu = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    return {"cpu": cpu_name(), "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _jsonable(x: Any) -> Any:
    """Numbers, strings, lists and dicts only; non-finite floats become None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.item() if x.numel() == 1 else x.tolist())
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item"):  # numpy scalars
        return _jsonable(x.item())
    return str(x)


# -- validation of records read from files -----------------------------------------------------
_INT_FIELDS = ("seed", "epochs", "steps")
_NAME_FIELDS = ("task", "model", "label", "device", "stopped_by")
_DICT_FIELDS = ("hardware", "metrics", "cost", "method_metrics", "budget")
_NUMBER_KEYS = {"metrics": ("accuracy", "loss"),
                "cost": ("wall_s", "train_s", "eval_s", "peak_mem_mb", "flops", "mfu", "energy_j")}


def check_record(d: dict, source: str = "record") -> None:
    """Refuse (ConfigError naming `source`) a record whose fields have the wrong types, whose names
    leave the `NAME` character set, or that nests deeper than `MAX_DEPTH`."""
    def bad(what: str):
        return ConfigError(f"{source} is not a valid record: {what}")

    _check_plain(d, 0, bad, "record")
    for key in _INT_FIELDS:
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 0):
            raise bad(f"{key} must be a non-negative integer, got {d[key]!r}")
    for key in _NAME_FIELDS:
        if key in d and d[key] is not None:
            _check_name(d[key], key, bad)
    for key in _DICT_FIELDS:
        if key in d and not isinstance(d[key], dict):
            raise bad(f"{key} must be an object, got {type(d[key]).__name__}")
    for key in ("haet_version", "error"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise bad(f"{key} must be a string")
    if not isinstance(d.get("methods", []), list):
        raise bad("methods must be a list")
    for m in d.get("methods", []):
        if not isinstance(m, dict) or not isinstance(m.get("params", {}), dict):
            raise bad("each method must be an object with a name and params")
        _check_name(m.get("name"), "method name", bad)
        for v in m.get("params", {}).values():
            if isinstance(v, str):
                _check_name(v, "method parameter", bad)
    if not isinstance(d.get("history", []), list) or not all(isinstance(h, dict) for h in d.get("history", [])):
        raise bad("history must be a list of objects")
    for field_name, keys in _NUMBER_KEYS.items():
        for k in keys:
            v = d.get(field_name, {}).get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise bad(f"{field_name}.{k} must be a number, got {v!r}")
    source_name = d.get("cost", {}).get("energy_source")
    if source_name is not None:
        _check_name(source_name, "cost.energy_source", bad)


def _check_plain(x: Any, depth: int, bad, where: str) -> None:
    """JSON data only, nested at most MAX_DEPTH, keys are names, strings at most MAX_TEXT long."""
    if depth > MAX_DEPTH:
        raise bad(f"nested deeper than {MAX_DEPTH} levels at {where}")
    if isinstance(x, dict):
        for k, v in x.items():
            _check_name(k, f"key in {where}", bad)
            _check_plain(v, depth + 1, bad, f"{where}.{k}")
    elif isinstance(x, list):
        for v in x:
            _check_plain(v, depth + 1, bad, where)
    elif isinstance(x, str):
        if len(x) > MAX_TEXT:
            raise bad(f"a string at {where} is longer than {MAX_TEXT} characters")
    elif not (x is None or isinstance(x, (bool, int, float))):
        raise bad(f"unexpected {type(x).__name__} at {where}")


def _check_name(value: Any, what: str, bad) -> None:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise bad(f"{what} {str(value)[:60]!r} is not a plain name "
                  "(letters, digits, spaces and _ . : = + , / @ ( ) [ ] - only, at most 200)")
