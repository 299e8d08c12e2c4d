"""Data impressions: class-conditional inputs synthesized from a trained model alone.

Zero-shot knowledge distillation (Nayak, Mopuri, Shaj, Babu and Chakraborty, ICML 2019): the
final layer's weights say which classes the model finds alike. Row k of the class-similarity
matrix (cosine similarity of the class weight vectors, min-max scaled to [0, 1]) is the
concentration of a Dirichlet; soft labels sampled from it are targets, and random inputs are
optimized until the model's tempered softmax matches them. The result carries what the model
knows about class k without any training sample: in the federated setting (Gudur and Perepu
2021) it is what a client may send instead of its data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.config import check_range


def class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """(C, C) cosine similarity of the final layer's class vectors, each row min-max scaled to [0, 1]."""
    w = nn.functional.normalize(weight.detach().float(), dim=1)
    sim = w @ w.T
    lo, hi = sim.min(dim=1, keepdim=True).values, sim.max(dim=1, keepdim=True).values
    return (sim - lo) / (hi - lo).clamp_min(1e-12)


def sample_soft_labels(similarity: torch.Tensor, cls: int, n: int, betas: tuple[float, ...],
                       generator: torch.Generator) -> torch.Tensor:
    """n soft labels for class `cls` from Dirichlet(β · similarity[cls]), split evenly over the βs."""
    conc = similarity[cls].clamp_min(1e-3)  # a zero concentration is not a Dirichlet
    out = []
    for i, beta in enumerate(betas):
        count = n // len(betas) + (1 if i < n % len(betas) else 0)
        gammas = torch._standard_gamma((beta * conc).expand(count, -1).contiguous(), generator=generator)
        out.append(gammas / gammas.sum(dim=1, keepdim=True).clamp_min(1e-30))
    return torch.cat(out)


def synthesize(model: nn.Module, classes: list[int], per_class: int, input_shape: tuple[int, ...], *,
               steps: int = 60, lr: float = 0.05, temperature: float = 20.0, betas: tuple[float, ...] = (1.0, 0.1),
               seed: int = 0, value_range: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Impressions of `classes`: (inputs (n, *input_shape), class index of each) from `model` alone.

    Inputs start uniform in `value_range` and are optimized with Adam against the cross-entropy
    between the model's softmax at `temperature` and the sampled soft label, then clipped to the
    range. The model's parameters are not changed.
    """
    check_range("per_class", per_class, 1, integer=True)
    check_range("steps", steps, 0, integer=True)
    if not classes:
        return torch.zeros(0, *input_shape), torch.zeros(0, dtype=torch.long)
    final = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    sim = class_similarity(final.weight)
    g = torch.Generator().manual_seed(seed)
    targets = torch.cat([sample_soft_labels(sim, c, per_class, betas, g) for c in classes])
    owner = torch.tensor([c for c in classes for _ in range(per_class)])
    lo, hi = value_range
    x = (lo + (hi - lo) * torch.rand(len(targets), *input_shape, generator=g)).requires_grad_(True)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)  # gradients flow to the inputs only
    opt = torch.optim.Adam([x], lr=lr)
    try:
        for _ in range(steps):
            logp = torch.log_softmax(model(x) / temperature, dim=1)
            loss = -(targets * logp).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
        model.train(was_training)
    return x.detach(), owner


def synthesis_flops(forward_flops_per_sample: float, samples: int, steps: int) -> float:
    """FLOPs of synthesis: forward + backward to the inputs (~2× forward) per step and sample."""
    return 3.0 * forward_flops_per_sample * samples * steps
