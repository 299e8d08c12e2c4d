"""haet: Hardware-Aware Efficient Training.

Train PyTorch models with less time, memory and energy, and measure it honestly::

    from haet import Trainer, Budget
    record = Trainer(model, train_data, eval_data, budget=Budget(time_s=600)).fit(epochs=20)
"""

__version__ = "0.1.0"

from .core.budget import Budget  # noqa: E402
from .core.errors import ConfigError  # noqa: E402
from .core.events import Event  # noqa: E402
from .core.loggers import Logger, MLflowLogger, TensorBoardLogger  # noqa: E402
from .core.method import Method  # noqa: E402
from .core.optim import Schedule, make_optimizer, make_schedule  # noqa: E402
from .core.options import Precision, Target, TrainOptions  # noqa: E402
from .core.record import RunRecord  # noqa: E402
from .core.state import State  # noqa: E402
from .core.trainer import Trainer, evaluate, seed_everything  # noqa: E402
from .data.loader import Loader, TensorData  # noqa: E402
from .methods import register_method  # noqa: E402


def load_model(directory, model=None, *, device="cpu"):
    """The model a run saved with ``save_model=True`` (``--save-model``); see `haet.core.saving`."""
    from .core.saving import load_model as _load

    return _load(directory, model, device=device)


__all__ = ["Trainer", "Budget", "Method", "Event", "State", "RunRecord", "ConfigError", "TensorData", "Loader",
           "evaluate", "seed_everything", "register_method", "TrainOptions", "Precision", "Target", "Schedule",
           "make_optimizer", "make_schedule", "Logger", "TensorBoardLogger", "MLflowLogger", "load_model",
           "__version__"]
