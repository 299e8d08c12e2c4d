"""Makes examples/custom_method.py importable by the tests."""

import importlib.util
import sys
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "examples" / "custom_method.py"
_spec = importlib.util.spec_from_file_location("custom_method", _path)
_module = importlib.util.module_from_spec(_spec)
sys.modules["custom_method"] = _module  # dataclasses look their module up here
_spec.loader.exec_module(_module)
GradientClipping = _module.GradientClipping
clip_gradients = _module.clip_gradients
