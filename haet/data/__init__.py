"""Tasks (data sets that ship or that the user provides) and the fast tensor loader."""

from .loader import Loader, TensorData, epoch_generator
from .tasks import TASKS, Task, check_model_for_task, get_task

__all__ = ["Loader", "TensorData", "epoch_generator", "TASKS", "Task", "get_task", "check_model_for_task"]
