"""Generative training: hierarchical VAEs on binary images, their loss and their evaluation.

    haet train --task mnist5k-bin --model srvae:layers=10,latents=10 --epochs 5

The models (`haet.generative.models`) return the per-sample negative ELBO from ``forward``, so
the Trainer, its budgets, meters and methods work unchanged: the loss is `negative_elbo` and the
evaluation `generative_eval` reports, in nats per image,

- ``neg_elbo`` (= ``loss``): the negative ELBO, with each model's KL estimator, one sample;
- ``nll``: the importance-weighted negative log-likelihood with K posterior samples (Burda et
  al. 2016), ``-log (1/K) sum_k p(x, z_k) / q(z_k | x)``, an upper bound of -log p(x) that
  tightens as K grows (``iw_samples``: the task parameter ``iw``);
- ``bits_per_dim``: ``nll / (D ln 2)``; ``recon`` and ``kl``: the two terms of the ELBO;
  ``active_units``: latent units whose posterior mean E_q[z | x] varies over the data
  (Cov_x > 0.01, Burda et al. 2016; for srvae the units of eps; the mean over the latents above
  is taken by averaging 8 posterior passes).

Evaluation draws its samples from its own seeded generator: it never moves the training's random
stream, and the same model gets the same figures.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.errors import ConfigError
from ..data.loader import Loader, TensorData
from .models import HVAE, SRVAE, HierarchicalVAE, LadderVAE, VaeParams, build_vae, matched_hidden

__all__ = ["HierarchicalVAE", "SRVAE", "LadderVAE", "HVAE", "VaeParams", "build_vae", "matched_hidden",
           "negative_elbo", "generative_eval", "iw_nll", "is_generative", "save_samples"]

#: Posterior passes averaged for the active-units count.
AU_PASSES = 8
#: Rows of posterior samples per chunk when estimating the importance-weighted likelihood.
IW_ROWS = 20_000


def is_generative(model: Any) -> bool:
    """Whether `model` (or the model inside a wrapper) is one of haet's generative models."""
    return bool(getattr(model, "generative", False))


def negative_elbo(outputs: torch.Tensor, targets: Any = None, reduction: str = "mean") -> torch.Tensor:
    """The loss of a generative task: the model's outputs are already per-sample negative ELBOs;
    the targets (the images' labels) are not read."""
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 1:
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ConfigError(f"a generative task needs a model that returns per-sample negative ELBOs (srvae, "
                          f"ladder-vae, hvae); this model returned {shape}")
    if reduction == "none":
        return outputs
    if reduction == "sum":
        return outputs.sum()
    return outputs.mean()


def iw_nll(model: HierarchicalVAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample importance-weighted NLL with `k` samples, (N,), drawn in chunks of `IW_ROWS` rows."""
    per_chunk = max(1, IW_ROWS // max(len(x), 1))
    parts, left = [], k
    while left > 0:
        c = min(per_chunk, left)
        parts.append(model.log_weights(x, c, generator=generator))
        left -= c
    log_w = torch.cat(parts, dim=0)
    return -(torch.logsumexp(log_w, dim=0) - math.log(k))


def generative_eval(model: torch.nn.Module, data: Any, device: torch.device, *, iw_samples: int = 100,
                    batch_size: int = 250, seed: int = 0) -> dict:
    """The metrics of the module's docstring over `data` (a TensorData of images and labels)."""
    if not is_generative(model):
        raise ConfigError(f"a generative task needs a generative model (srvae, ladder-vae, hvae), got "
                          f"{type(model).__name__}")
    if isinstance(iw_samples, bool) or not isinstance(iw_samples, int) or iw_samples < 1:
        raise ConfigError(f"iw_samples must be a positive integer, got {iw_samples!r}")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = Loader(data, batch_size, shuffle=False) if isinstance(data, TensorData) else data
    n = 0
    sums = {"neg_elbo": 0.0, "recon": 0.0, "kl": 0.0, "nll": 0.0}
    means = []
    with torch.no_grad():
        for x, *_ in batches:
            x = x.to(device)
            terms = model.layers(x, generator=generator)
            recon = -model.log_likelihood(x, terms)
            kl = sum(model.layer_kl(terms))
            sums["recon"] += float(recon.sum())
            sums["kl"] += float(kl.sum())
            sums["neg_elbo"] += float((recon + kl).sum())
            sums["nll"] += float(iw_nll(model, x, iw_samples, generator).sum())
            # E_q[z | x] per layer, averaged over AU_PASSES passes: a layer's posterior mean depends on the
            # latents sampled above it, whose noise would otherwise count as activity.
            mean = torch.cat([t.mu_q.float() for t in terms], dim=-1)
            for _ in range(AU_PASSES - 1):
                mean += torch.cat([t.mu_q.float() for t in model.layers(x, generator=generator)], dim=-1)
            means.append((mean / AU_PASSES).cpu())
            n += len(x)
    model.train(was_training)
    if n == 0:
        return {}
    out = {k: v / n for k, v in sums.items()}
    mu = torch.cat(means)
    out["active_units"] = int((mu.var(dim=0, unbiased=len(mu) > 1) > 0.01).sum()) if len(mu) > 1 else 0
    out["bits_per_dim"] = out["nll"] / (model.dim * math.log(2))
    out["iw_samples"] = iw_samples
    return {"loss": out["neg_elbo"], **out}


def save_samples(model: HierarchicalVAE, path, n: int = 16, seed: int = 0, title: str = ""):
    """A PNG grid of `n` samples (pixel probabilities) drawn from the model with a seeded generator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core import files

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = model.sample(n, torch.Generator(device=device).manual_seed(seed)).float().cpu()
    model.train(was_training)
    side = math.ceil(math.sqrt(n))
    h, w = images.shape[-2:] if images.dim() >= 3 else (1, images.shape[-1])
    grid = torch.zeros(side * h, side * w)
    for i, img in enumerate(images.reshape(n, h, w)):
        r, c = divmod(i, side)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title(title or f"{n} samples (pixel probabilities), seed {seed}", fontsize=9)
    fig.tight_layout()
    try:  # into a file haet opened itself: never through a symlink
        return files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
