"""RunRecord: what a run did and what it cost (``DIR/record.json``, schema version 1).

The schema is a contract (DESIGN.md): fields may be added, none renamed or removed without
bumping ``SCHEMA``. Records are plain JSON, read as data.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

SCHEMA = 1


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
        """Write ``record.json`` into `directory` atomically (write, then rename)."""
        path = Path(directory) / "record.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        if d.get("schema") != SCHEMA:
            raise ConfigError(f"record schema {d.get('schema')!r} is not supported (this haet reads schema {SCHEMA})")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunRecord":
        path = Path(path)
        if path.is_dir():
            path = path / "record.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no record at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not a valid record (JSON error: {err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a valid record (expected a JSON object)")
        return cls.from_dict(data)

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
