"""Training on the device: incremental updates of a deployed model on a user's own data (MoIL),
and learning from a few labels (prototypes, FixMatch-like semi-supervised training)."""

from .cache import FeatureCache
from .shifts import SHIFTS, user_data
from .moil import IncrementalConfig, split_model, run_updates

__all__ = ["FeatureCache", "SHIFTS", "user_data", "IncrementalConfig", "split_model", "run_updates"]
