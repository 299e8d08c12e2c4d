"""Reference models, built for a task's input shape and number of classes.

- ``mnist5k-cnn``: DESIGN.md's default, conv(1→16, 3×3)–ReLU–maxpool–conv(16→32, 3×3)–ReLU–
  maxpool–flatten–linear (1568→10 on 28×28).
- ``mlp``: flatten–Linear(·→512)–ReLU–Linear(512→512)–ReLU–Linear(512→classes).
- ``resnet8``: a small ResNet (16-32-64 channels, one basic block per stage) ending in global
  average pooling, so it accepts any image size.
- ``mnist1d-cnn``: a 1-D CNN for mnist1d's 40-sample signals.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.errors import ConfigError, choices_error
from .transformer import transformer


def mnist5k_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), num_classes),
    )


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (512, 512)) -> nn.Module:
    n_in = 1
    for d in input_shape:
        n_in *= d
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    layers.append(nn.Linear(n_in, num_classes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """Stem conv, three stages (16, 32, 64 channels; stride 1, 2, 2), global average pooling, linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths=(16, 32, 64)) -> None:
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(BasicBlock(c_in, w, 1 if i == 0 else 2))
            c_in = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def mnist1d_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, length = input_shape
    return nn.Sequential(
        nn.Conv1d(c, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * ((length + 3) // 4), num_classes),
    )


MODELS: dict[str, tuple[Callable[[tuple[int, ...], int], nn.Module], str]] = {
    "mnist5k-cnn": (mnist5k_cnn, "two 3×3 conv layers, max pooling, one linear layer (DESIGN.md default)"),
    "mlp": (mlp, "multilayer perceptron with two hidden layers of 512"),
    "resnet8": (ResNet8, "small ResNet, 16-32-64 channels, global average pooling"),
    "mnist1d-cnn": (mnist1d_cnn, "1-D CNN for mnist1d signals"),
    "transformer": (transformer, "encoder-decoder Transformer (conv front-end, 2+2 layers, d 64) for mnist1d-seq"),
    "eqprop-mlp": (lambda shape, classes: _eqprop_mlp(shape, classes),
                   "energy-based MLP (one hidden layer of 256) trained by equilibrium propagation (--method eqprop)"),
}


def _recipe_net(kind: str):
    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        from .. import recipes

        return (recipes.fast_cnn if kind == "cnn" else recipes.fast_resnet)(input_shape, num_classes)

    return build


MODELS["fast-cnn"] = (_recipe_net("cnn"), "the fast recipe's conv net with BatchNorm (haet.recipes.fast_cnn)")
MODELS["fast-resnet"] = (_recipe_net("resnet"), "the fast recipe's narrow ResNet-9 shape for natural images")


def _eqprop_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from ..eqprop import eqprop_mlp

    return eqprop_mlp(input_shape, num_classes)


#: Models that take parameters (``--model NAME:k=v,k=v``): name -> (frozen dataclass,
#: ``build(input_shape, num_classes, params)``).
MODEL_PARAMS: dict[str, tuple[type, Callable]] = {}


def _parse_spec(spec: str):
    from ..core.config import parse_kv, parse_params

    base, sep, rest = spec.partition(":")
    if base not in MODELS:
        raise choices_error("model", base, MODELS)
    if base not in MODEL_PARAMS:
        if sep:
            raise ConfigError(f"model {base} takes no parameters, got {rest!r}")
        return base, None
    params_class = MODEL_PARAMS[base][0]
    return base, parse_params(params_class, parse_kv(rest, f"model {base}") if sep else {}, owner=f"model {base}")


def check_model_spec(spec: str) -> None:
    """Raise ConfigError when `spec` names no model or gives it a bad parameter."""
    _parse_spec(spec)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model `name` (``mlp``, ``srvae:layers=10,latents=10``) for this input shape and class count."""
    base, params = _parse_spec(name)
    if params is not None:
        try:
            return MODEL_PARAMS[base][1](tuple(input_shape), num_classes, params)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return MODELS[base][0](tuple(input_shape), num_classes)


def _register_graph_models() -> None:
    from ..graph.models import GRAPH_MODELS  # torch_geometric is imported only when one is built

    MODELS.update(GRAPH_MODELS)


_register_graph_models()


def _register_generative_models() -> None:
    from ..generative.models import KINDS, VaeParams

    described = {"srvae": "self-reflective VAE: L raster blocks, bijective latent layers, posterior sharing the "
                          "bijectors (srvae:layers=10,latents=10,hidden=256)",
                 "ladder-vae": "ladder VAE: top-down inference with precision-weighted, shared priors (same "
                               "parameter count as srvae unless hidden= is given)",
                 "hvae": "hierarchical VAE with a bottom-up posterior (same parameter count as srvae unless "
                         "hidden= is given)"}
    for kind, cls in KINDS.items():
        def build(shape, classes, params, cls=cls):
            return cls(shape, params)

        MODELS[kind] = (lambda shape, classes, cls=cls: cls(shape, VaeParams()), described[kind])
        MODEL_PARAMS[kind] = (VaeParams, build)


_register_generative_models()
