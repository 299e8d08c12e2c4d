"""Layers that methods put into models: factorized and low-precision replacements of dense layers.

- `TensorTrainLinear`: a Linear whose weight is a tensor train (TT-matrix) of small cores,
  optionally fake-quantized (used by the ``tensor_train`` method).
"""

from .tensor_train import TensorTrainLinear, fake_quantize, full_ranks, tt_modes, tt_svd

__all__ = ["TensorTrainLinear", "fake_quantize", "full_ranks", "tt_modes", "tt_svd"]
