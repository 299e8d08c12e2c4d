"""Keep a trained model: ``DIR/model.safetensors`` + ``DIR/model.json``, and load it back.

    Trainer(..., save_model=True, out_dir=DIR).fit(5)      # haet train --save-model
    model = haet.load_model(DIR)                           # the trained model, methods' layers included

The weights go into safetensors (plain tensors, no pickle: loading never runs code from the
file). model.json holds what is needed to rebuild the module the weights belong to: the task and
model names (haet's registries), the input shape, and the methods in order with their parameters
and final state (tensors of that state are stored in the safetensors file). `load_model` builds a
fresh model, lets each method transform it as at the start of training (quantized, binary,
sparse, tensor-train layers...), restores the methods' state (grown widths, pruned ranks), then
loads the weights strictly: a missing or unexpected tensor is an error, never a silent partial
load. model.json is validated as data (types, names, sizes) before anything is built from it.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

WEIGHTS, META = "model.safetensors", "model.json"
FORMAT = "haet-model"
VERSION = 1
MAX_META_BYTES = 8 * 2**20
_TENSOR = "__tensor__"
_METHOD_PREFIX = "__method__"


def save_model(directory: str | Path, model: nn.Module, methods=(), *, task: str | None = None,
               model_name: str | None = None, input_shape=None, num_classes: int | None = None,
               seed: int = 0, label: str = "", optimizer: torch.optim.Optimizer | None = None,
               batch_size: int | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into `directory`; returns the weights' path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for key in list(tensors):
        if key.startswith(_METHOD_PREFIX):
            raise ConfigError(f"model parameter {key!r} clashes with haet's reserved prefix {_METHOD_PREFIX}")
    saved_methods = []
    for i, m in enumerate(methods):
        state = _encode(m.state_dict(), f"{_METHOD_PREFIX}.{i}", tensors)
        saved_methods.append({"name": m.name, "params": _jsonable(m.params()), "state": state})
    _dedupe_storage(tensors)
    meta = {"format": FORMAT, "version": VERSION, "task": task, "model": model_name,
            "input_shape": list(input_shape) if input_shape is not None else None, "num_classes": num_classes,
            "seed": seed, "label": label, "methods": saved_methods, "optimizer": _optimizer_spec(optimizer),
            "batch_size": batch_size}
    weights = directory / WEIGHTS
    save_file(tensors, str(weights))
    (directory / META).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return weights


def read_meta(directory: str | Path) -> dict:
    """model.json, validated."""
    path = Path(directory) / META
    if not path.is_file():
        raise ConfigError(f"no saved model in {directory} (no {META}; train with --save-model)")
    if path.stat().st_size > MAX_META_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_META_BYTES} bytes; refusing to read it")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    _validate(meta, path)
    return meta


def load_model(directory: str | Path, model: nn.Module | None = None, *, device: str | torch.device = "cpu"
               ) -> nn.Module:
    """The model saved in `directory` (in eval mode). `model`: a fresh instance of your own
    architecture when it is not one of haet's models."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..data.tasks import get_task
    from ..methods import get_method_class
    from ..models import build_model

    directory = Path(directory)
    meta = read_meta(directory)
    task = None
    if meta["task"]:
        with contextlib.suppress(ConfigError):  # a task with parameters (sbm:nodes=..) is found by its spec
            task = get_task(meta["task"])
    input_shape = tuple(meta["input_shape"] or (task.input_shape if task else ()))
    num_classes = meta["num_classes"] if meta["num_classes"] is not None else (task.num_classes if task else None)
    if model is None:
        if meta["model"] is None or num_classes is None or not input_shape:
            raise ConfigError(f"{directory}: the saved model is not one of haet's models; pass model=<a fresh instance>")
        model = build_model(meta["model"], input_shape, num_classes)
    try:
        tensors = load_file(str(directory / WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"cannot read {directory / WEIGHTS}: {err}") from None
    methods = [_build_method(get_method_class(m["name"]), m["params"]) for m in meta["methods"]]
    if methods:
        _transform(model, methods, meta, input_shape, tensors)
    weights = {k: v for k, v in tensors.items() if not k.startswith(_METHOD_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{directory / WEIGHTS} does not fit the rebuilt model: {err}") from None
    return model.to(device).eval()


# -- rebuilding ------------------------------------------------------------------------------
def _transform(model: nn.Module, methods: list, meta: dict, input_shape: tuple, tensors: dict) -> None:
    """Let each method change the model as at fit start, then restore its saved state."""
    from ..data.loader import TensorData
    from .clock import PhaseClock
    from .state import State

    # A batch of the training batch's size: some transforms size themselves by it (a memory bound
    # that measures a step's activations).
    n = meta.get("batch_size") or 2
    example = TensorData(torch.zeros(n, *input_shape), torch.zeros(n, dtype=torch.long))
    # Some transforms size themselves by the optimizer (a memory bound that counts its state): the
    # same kind of optimizer as in training, never updated here.
    state = State(model=model, optimizer=_optimizer_like(meta.get("optimizer"), model),
                  loss_fn=nn.functional.cross_entropy, device=torch.device("cpu"), seed=meta["seed"],
                  clock=PhaseClock("cpu"), train_data=example, epochs=1, epoch=1, batch_size=n)
    for method in methods:
        fit_start = getattr(method, "fit_start", None)
        if callable(fit_start):
            fit_start(state)
    for method, saved in zip(methods, meta["methods"]):
        method.load_state_dict(_decode(saved["state"], tensors))


#: Optimizers a saved model may name (torch.optim classes, rebuilt with plain-number settings).
OPTIMIZER_NAMES = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")


def _optimizer_spec(optimizer) -> dict | None:
    if optimizer is None or type(optimizer).__name__ not in OPTIMIZER_NAMES:
        return None
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in optimizer.defaults.items()
                if isinstance(v, (bool, int, float)) or (isinstance(v, tuple) and all(isinstance(i, float) for i in v))}
    return {"name": type(optimizer).__name__, "defaults": _jsonable(defaults)}


def _optimizer_like(spec: dict | None, model: nn.Module) -> torch.optim.Optimizer:
    if spec is not None:
        cls = getattr(torch.optim, spec["name"])
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["defaults"].items()}
        try:
            return cls(model.parameters(), **kwargs)
        except (TypeError, ValueError):
            pass
    return torch.optim.SGD(model.parameters(), lr=0.0)


def _build_method(cls, params: dict):
    if cls.config_class is None:
        return cls()
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls.config_class)
    names = {f.name for f in dataclasses.fields(cls.config_class) if f.init}
    unknown = set(params) - names
    if unknown:
        raise ConfigError(f"saved parameters {sorted(unknown)} are not parameters of {cls.name}")
    values = {}
    for key, value in params.items():
        origin = typing.get_origin(hints[key])
        values[key] = tuple(value) if isinstance(value, list) and origin is tuple else value
    return cls(cls.config_class(**values))


# -- tensors inside method state --------------------------------------------------------------
def _encode(x: Any, path: str, tensors: dict) -> Any:
    if isinstance(x, torch.Tensor):
        tensors[path] = x.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(x, dict):
        return {str(k): _encode(v, f"{path}.{k}", tensors) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(x)]
    return _jsonable(x)


def _decode(x: Any, tensors: dict) -> Any:
    if isinstance(x, dict):
        if set(x) == {_TENSOR}:
            key = x[_TENSOR]
            if key not in tensors:
                raise ConfigError(f"the saved model refers to a tensor {key!r} that its weights file lacks")
            return tensors[key]
        return {k: _decode(v, tensors) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    return x


def _dedupe_storage(tensors: dict) -> None:
    """safetensors refuses tensors that share memory: give each its own copy."""
    seen = set()
    for key, t in tensors.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr in seen or (ptr is not None and t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            tensors[key] = t.clone()
        seen.add(ptr)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if hasattr(x, "item"):
        return _jsonable(x.item())
    raise ConfigError(f"cannot save a value of type {type(x).__name__} in model.json")


# -- validation of model.json (files other people made are data, never trusted) ----------------
def _validate(meta: Any, path: Path) -> None:
    def bad(what: str):
        raise ConfigError(f"{path} is not a valid saved model: {what}")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        bad(f"format must be {FORMAT!r}")
    if meta.get("version") != VERSION:
        bad(f"version {meta.get('version')!r} is not supported (this haet reads version {VERSION})")
    for key in ("task", "model", "label"):
        if meta.get(key) is not None and (not isinstance(meta[key], str) or len(meta[key]) > 200):
            bad(f"{key} must be a short string")
    shape = meta.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and 0 < len(shape) <= 8 and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1_000_000 for d in shape)):
        bad("input_shape must be a list of 1-8 positive integers")
    for key in ("num_classes", "seed"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            bad(f"{key} must be a non-negative integer")
    v = meta.get("batch_size")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 65536):
        bad("batch_size must be an integer in [1, 65536]")
    opt = meta.get("optimizer")
    if opt is not None and not (isinstance(opt, dict) and set(opt) == {"name", "defaults"}
                                and opt["name"] in OPTIMIZER_NAMES and isinstance(opt["defaults"], dict)
                                and all(isinstance(k, str) and _plain(v, depth=1) for k, v in opt["defaults"].items())):
        bad(f"optimizer must be {{name, defaults}} with name one of {', '.join(OPTIMIZER_NAMES)}")
    methods = meta.get("methods")
    if not isinstance(methods, list) or len(methods) > 32:
        bad("methods must be a list")
    for m in methods:
        if not isinstance(m, dict) or set(m) != {"name", "params", "state"} or not isinstance(m["name"], str) \
                or not isinstance(m["params"], dict):
            bad("each method must be {name, params, state}")
        if not all(_plain(v, depth=1) and not isinstance(v, dict) and not (
                isinstance(v, list) and any(isinstance(i, (list, dict)) for i in v)) for v in m["params"].values()):
            bad(f"parameters of {m['name']!r} must be numbers, strings, booleans or lists of them")
        if not _plain(m["state"], depth=12):
            bad(f"state of {m['name']!r} must be plain data")


def _plain(x: Any, depth: int) -> bool:
    if x is None or isinstance(x, (bool, int, str)):
        return not isinstance(x, str) or len(x) <= 10_000
    if isinstance(x, float):
        return math.isfinite(x)
    if depth <= 0:
        return False
    if isinstance(x, list):
        return all(_plain(v, depth - 1) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v, depth - 1) for k, v in x.items())
    return False
