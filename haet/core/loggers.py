"""Loggers: where a run's metrics go besides record.json and metrics.jsonl.

One small interface, `Logger` (``log_metrics(step, metrics)``, ``close()``), that a user can
implement for anything else. Two come with haet, in the ``log`` extra (``pip install 'haet[log]'``):

- `TensorBoardLogger`: event files under ``DIR/tensorboard`` (``tensorboard --logdir DIR``);
- `MLflowLogger`: a run in an MLflow tracking store, by default a local SQLite store
  ``DIR/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db``); nothing is sent
  anywhere unless a tracking URI is given. (MLflow 3 keeps its plain-file store in maintenance
  mode and refuses it by default; SQLite is its recommended local store.)

The Trainer logs each evaluation line (epoch, step, train loss, evaluated metrics, train seconds)
at its optimizer step, and the final metrics and costs when the run ends.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import ConfigError

LOGGER_NAMES = ("tensorboard", "mlflow")


class Logger:
    """Receives a run's numbers. Subclass it and pass instances as ``Trainer(loggers=[...])``."""

    def log_params(self, params: dict[str, Any]) -> None:
        """What the run was asked for (task, model, methods, seed); called once at the start."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release; called once when the run ends (also after an error)."""


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numbers of `metrics`, nested dicts flattened with ``/``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in numeric(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out


class TensorBoardLogger(Logger):
    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--log tensorboard needs the log extra: pip install 'haet[log]'") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("run", "\n".join(f"- {k}: {v}" for k, v in params.items()))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MLflowLogger(Logger):
    def __init__(self, db_path: str | Path | None = None, *, tracking_uri: str | None = None,
                 experiment: str = "haet", run_name: str | None = None) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("--log mlflow needs the log extra: pip install 'haet[log]'") from None
        import logging

        for name in ("mlflow", "alembic"):  # their set-up chatter (creating tables) is not the run's output
            logging.getLogger(name).setLevel(logging.WARNING)
        if tracking_uri is None:
            if db_path is None:
                raise ConfigError("MLflowLogger needs a db_path (a local SQLite store) or a tracking_uri")
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{Path(db_path).resolve()}"
        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in numeric(metrics).items():
            self.client.log_metric(self.run_id, _mlflow_key(key), value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    # MLflow admits letters, digits, _ - . / and space in metric names.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def make_loggers(names, out_dir: str | Path | None, run_name: str | None = None) -> list[Logger]:
    """Loggers from their names (``tensorboard``, ``mlflow``), writing under `out_dir`."""
    loggers: list[Logger] = []
    for name in names or ():
        if name not in LOGGER_NAMES:
            raise ConfigError(f"unknown logger {name!r}; choose one of: {', '.join(LOGGER_NAMES)}")
        if out_dir is None:
            raise ConfigError(f"--log {name} needs an output directory")
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(Path(out_dir) / "tensorboard"))
        else:
            loggers.append(MLflowLogger(Path(out_dir) / "mlflow.db", run_name=run_name))
    return loggers
