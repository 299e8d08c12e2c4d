"""The base class of every haet method.

A method is a functional form that works without the Trainer (``grad_match_select(...)``,
``apply_qat(model, cfg)``) plus a thin subclass of `Method` that stores a frozen, validated config
and calls the functional form on the right events. Handlers are plain methods named after the
event (``def epoch_start(self, state)``); the Trainer calls only the handlers a method defines.

What a handler may change, through `state` (see `haet.core.state.State`):
- the batch (``state.batch`` at BATCH_START), the data of an epoch (``state.train_loader`` at
  EPOCH_START), per-sample loss weights (a third batch element);
- the loss (``state.loss`` at AFTER_FORWARD);
- the model (module surgery with `haet.core.surgery.replace_modules`, which keeps the optimizer in
  step and bumps ``state.model_version`` so the FLOPs meter re-measures);
- the optimizer step (``state.step_fn``), or the gradients (at AFTER_BACKWARD);
- whether the run goes on (``state.request_stop(reason)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .errors import ConfigError
from .events import Listener

#: What a method can own. Two methods of one run may not own the same capability: the Trainer
#: refuses the pair at construction, naming both and the capability.
CAPABILITIES: dict[str, str] = {
    "backward": "computes the gradients (replaces loss.backward, state.backward_fn)",
    "optimizer_step": "performs the parameter update (replaces optimizer.step, state.step_fn)",
    "weight_format": "sets the number format the weights are used in (quantization, binarization)",
    "weight_sparsity": "decides which weights are zero",
    "layer_types": "replaces the model's Linear/Conv layers by layers of its own",
    "model_width": "changes the number of neurons or channels during training",
    "batch_shape": "changes the shape of the training batches",
    "data_selection": "chooses which samples each epoch trains on, and their weights",
}


def capability_conflicts(methods: list["Method"]) -> str | None:
    """A message naming the first two methods that own one capability, or None."""
    owner: dict[str, str] = {}
    for m in methods:
        for cap in sorted(m.owns):
            if cap in owner:
                return (f"{owner[cap]} and {m.name} cannot run together: both own {cap!r} "
                        f"({CAPABILITIES.get(cap, 'declared by the methods')})")
            owner[cap] = m.name
    return None


class Method(Listener):
    #: Command-line name (the table in DESIGN.md), e.g. "gradmatch".
    name: ClassVar[str] = ""
    #: One line for ``haet methods``.
    summary: ClassVar[str] = ""
    #: The paper the method comes from.
    paper: ClassVar[str] = ""
    #: The frozen dataclass of hyperparameters.
    config_class: ClassVar[type | None] = None
    #: The capabilities this method owns (keys of `CAPABILITIES`); the Trainer refuses two owners of one.
    owns: ClassVar[frozenset[str]] = frozenset()
    #: For an owner of "optimizer_step": whether its update reads the optimizer's per-group
    #: hyperparameters (lr, weight decay), which other methods may set per layer.
    reads_group_hyperparameters: ClassVar[bool] = True
    #: For an owner of "backward": whether the gradients it leaves are the loss's own (micro-batched
    #: backprop) or an estimate of another kind (equilibrium propagation).
    exact_gradients: ClassVar[bool] = True

    def __init__(self, config: Any = None, /, **params: Any) -> None:
        if self.config_class is None:
            if config is not None or params:
                raise ConfigError(f"{self.name or type(self).__name__} takes no parameters")
            self.config = None
            return
        if config is not None and params:
            raise ConfigError("give either a config object or keyword parameters, not both")
        if config is None:
            try:
                config = self.config_class(**params)
            except TypeError as err:  # an unknown keyword
                names = ", ".join(f.name for f in dataclasses.fields(self.config_class))
                raise ConfigError(f"{self.name}: {err}; parameters are: {names}") from None
        elif not isinstance(config, self.config_class):
            raise ConfigError(f"{self.name} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    # -- composition, results, checkpoints ----------------------------------------------------
    def check_model(self, model) -> None:
        """Raise ConfigError when this method cannot work on `model` (no eligible layer, a kind of
        network it does not handle); called by the Trainer at construction, before any step."""

    def check_compatible(self, others: list["Method"]) -> None:
        """Raise ConfigError when this method cannot run with one of `others` for a reason its
        capabilities (`owns`) do not express (the Trainer checks those first)."""

    def params(self) -> dict:
        """Hyperparameters for the RunRecord."""
        return dataclasses.asdict(self.config) if self.config is not None else {}

    def metrics(self) -> dict[str, Any]:
        """Final ``<name>/<quantity>`` values for ``record.method_metrics``."""
        return {}

    def epoch_metrics(self) -> dict[str, Any]:
        """``<name>/<quantity>`` values added to each epoch's history line."""
        return {}

    def state_dict(self) -> dict:
        """Everything needed to resume (tensors, numbers, strings, lists and dicts only)."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"
