"""Policies, their quantized copies, and the weight payload the learner broadcasts to actors.

The learner trains an fp32 MLP. At each broadcast it encodes the weights once, in the actors'
number format: ``int8`` runs ``torch.ao.quantization.quantize_dynamic`` (per-tensor int8 weights,
activations quantized on the fly at each call) and ships the int8 weights with their scales,
``fp16`` ships half-precision weights for PyTorch's fp16 dynamic Linear, ``fp32`` ships the
weights as they are. So an int8 broadcast carries one byte per weight (biases stay fp32) and the
quantization runs once per broadcast rather than once per actor. An actor loads the payload into
its dynamic-quantized module with ``set_weight_bias``, which repacks the weights for the CPU
kernels: the result equals ``quantize_dynamic`` of the learner's fp32 policy.

Payloads are plain dicts of numpy arrays, so Ray moves them without pickling tensors and one
``ray.put`` serves every actor.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
import torch
from torch import nn

_QDTYPE = {"int8": torch.qint8, "fp16": torch.float16}


def mlp(in_dim: int, out_dim: int, width: int, depth: int, *, out_act: nn.Module | None = None) -> nn.Sequential:
    """`depth` hidden Linear+ReLU layers of `width` units, then a Linear head (and `out_act`)."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


def make_policy(obs_dim: int, out_dim: int, width: int, depth: int, *, action_scale: float | None = None) -> nn.Sequential:
    """The policy network: Q-values per action (``action_scale`` None) or a deterministic action
    in [-action_scale, action_scale] (tanh head)."""
    return mlp(obs_dim, out_dim, width, depth, out_act=None if action_scale is None else _Scale(action_scale))


def quantize_policy(policy: nn.Module, precision: str) -> nn.Module:
    """An inference copy of `policy` in `precision`: PyTorch dynamic quantization of its Linear
    layers (int8 or fp16), or a plain fp32 copy. The original is not modified."""
    policy = copy.deepcopy(policy).cpu().eval()
    if precision == "fp32":
        return policy
    with _quiet_quantization():
        return torch.ao.quantization.quantize_dynamic(policy, {nn.Linear}, dtype=_QDTYPE[precision])


def encode_weights(policy: nn.Module, precision: str) -> dict:
    """The broadcast payload of `policy` for actors running in `precision`."""
    layers = []
    if precision == "int8":
        for layer in _linears(quantize_policy(policy, "int8")):
            w, b = layer._packed_params._weight_bias()
            layers.append({"weight": w.int_repr().numpy(), "scale": float(w.q_scale()),
                           "zero_point": int(w.q_zero_point()), "bias": _np(b, np.float32)})
    else:
        dtype = np.float16 if precision == "fp16" else np.float32
        for layer in _linears(policy):
            layers.append({"weight": _np(layer.weight, dtype), "bias": _np(layer.bias, np.float32)})
    return {"precision": precision, "layers": layers}


def payload_bytes(payload: dict) -> int:
    """Bytes of the arrays a payload carries (scales and zero points: 8 bytes each per layer)."""
    total = 0
    for layer in payload["layers"]:
        total += layer["weight"].nbytes + (0 if layer["bias"] is None else layer["bias"].nbytes)
        total += 8 if "scale" in layer else 0
    return total


def load_weights(qpolicy: nn.Module, payload: dict) -> None:
    """Load a payload into a module made by `quantize_policy` with the same precision."""
    layers = _linears(qpolicy)
    if len(layers) != len(payload["layers"]):
        raise ValueError(f"payload has {len(payload['layers'])} layers, the policy {len(layers)}")
    with torch.no_grad(), _quiet_quantization():
        for layer, p in zip(layers, payload["layers"]):
            bias = None if p["bias"] is None else torch.from_numpy(p["bias"])
            if payload["precision"] == "int8":
                w = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["weight"]), p["scale"], p["zero_point"])
                layer.set_weight_bias(w, bias)
            elif payload["precision"] == "fp16":
                layer.set_weight_bias(torch.from_numpy(p["weight"]).float(), bias)
            else:
                layer.weight.copy_(torch.from_numpy(p["weight"]))
                if bias is not None:
                    layer.bias.copy_(bias)


def linear_weight_count(policy: nn.Module) -> tuple[int, int]:
    """(weights, biases) of the Linear layers of an fp32 policy."""
    layers = [m for m in policy.modules() if isinstance(m, nn.Linear)]
    return sum(m.weight.numel() for m in layers), sum(m.bias.numel() for m in layers if m.bias is not None)


class _Scale(nn.Module):
    """tanh, scaled to the action bound (kept outside the Linear layers, so it stays fp32)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * self.scale



def _linears(module: nn.Module) -> list[nn.Module]:
    dyn = torch.ao.nn.quantized.dynamic.Linear
    return [m for m in module.modules() if isinstance(m, (nn.Linear, dyn))]


def _np(t: torch.Tensor | None, dtype) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy().astype(dtype, copy=True)


@contextlib.contextmanager
def _quiet_quantization():
    # torch.ao.quantization warns of its deprecation on every call; the dynamic int8/fp16 Linear
    # kernels it wraps are still the fastest eager CPU path in torch 2.13 (torchao's were not faster).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        yield
