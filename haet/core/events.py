"""The events the Trainer fires, in the order it fires them.

Every method and meter receives them through one signature, ``on_event(event, state)``.

    FIT_START
      EPOCH_START
        BATCH_START        the batch is in ``state.batch``; a method may replace it
        AFTER_FORWARD      ``state.outputs`` and ``state.loss`` exist; a method may replace the loss
        AFTER_BACKWARD     gradients exist; a method may change them
        AFTER_STEP         the optimizer has stepped (``state.step`` counts optimizer steps)
        BATCH_END
      EPOCH_END
      BEFORE_EVAL          pending updates must be applied before the model is read
      AFTER_EVAL           ``state.eval_metrics`` holds the evaluation
    FIT_END
"""

from enum import Enum


class Event(str, Enum):
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_FORWARD = "after_forward"
    AFTER_BACKWARD = "after_backward"
    AFTER_STEP = "after_step"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    BEFORE_EVAL = "before_eval"
    AFTER_EVAL = "after_eval"
    FIT_END = "fit_end"


class Listener:
    """Something the Trainer notifies: a handler is a method named after the event, taking the state."""

    def handlers(self) -> dict[Event, object]:
        """The bound handler of each event this listener defines."""
        out = {}
        for event in Event:
            fn = getattr(self, event.value, None)
            if callable(fn):
                out[event] = fn
        return out

    def on_event(self, event: Event, state) -> None:
        """Dispatch one event (the Trainer uses `handlers` to skip the events a listener ignores)."""
        fn = getattr(self, event.value, None)
        if callable(fn):
            fn(state)
