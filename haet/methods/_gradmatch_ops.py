"""The numerical kernels of GRAD-MATCH: last-layer gradients, their Gram matrices, batched OMP.

Per-example last-layer gradients are never materialized. For a final ``nn.Linear`` with input
``h`` (d) and logits ``z = W h + b`` (C), the gradient of the loss with respect to (W, b) is
``(g hᵀ, g)`` with ``g = ∂loss/∂z`` (``softmax(z) − onehot(y)`` for cross-entropy), so

    ⟨∇ᵢ, ∇ⱼ⟩ = (gᵢ·gⱼ) · (hᵢ·hⱼ + 1) = (gᵢ·gⱼ) · (h̃ᵢ·h̃ⱼ),   h̃ = [h, 1]

and a pool's Gram matrix is two batched matrix products and an elementwise product. Orthogonal
matching pursuit then works on Gram matrices only, for many independent pools at once (one per
class, or per chunk of a large class), with an incremental Cholesky factor of the regularized
normal equations: each step costs one batched matrix-vector product and two triangular solves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.errors import ConfigError
from ..core.surgery import is_linear_like


# -- last-layer gradient features ------------------------------------------------------------
def find_last_linear(model: nn.Module) -> tuple[str, nn.Module]:
    """The last linear layer registered in `model` (the layer whose gradients GRAD-MATCH matches):
    an ``nn.Linear`` or a layer standing in for one (sparse, factorized, quantized;
    `haet.core.surgery.is_linear_like`). Its gradient with respect to its dense-equivalent weight
    is ``g hᵀ`` whatever its parameterization, so the closed form holds for all of them."""
    found = [(n, m) for n, m in model.named_modules() if is_linear_like(m)]
    if not found:
        raise ConfigError(f"gradmatch needs a model that ends in a linear layer; {type(model).__name__} has none")
    return found[-1]


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (AVX512-BF16/AMX CPUs, recent GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.no_grad()
def last_layer_features(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None, *,
                        batch_size: int = 64, bfloat16: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Inputs of the final linear layer with a column of ones appended, ``H`` (N, d+1) = [h, 1]
    (the ones stand for the bias), logit gradients ``G`` (N, C) of the loss, and the FLOPs of the
    forward pass (counted on the first batch, scaled to N).

    One forward pass in eval mode (BatchNorm statistics are not touched); no backward through the
    network. `loss_fn` None or ``F.cross_entropy`` uses the closed form ``softmax(z) − onehot(y)``;
    another loss is differentiated with respect to the logits only (it must take ``reduction``).
    With `bfloat16` the pass runs under bfloat16 autocast (H and G are returned in float32).
    The batch size is small on purpose: on a CPU, larger batches fall out of cache.
    """
    name, layer = find_last_linear(model)
    captured: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, inp, out: captured.append((inp[0], out)))]
    if x.device.type == "cpu":  # NCHW max pooling is slow on CPUs; channels-last halves this pass
        handles += [m.register_forward_hook(_channels_last) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    model.eval()
    H, gs, flops = None, [], 0.0
    try:
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            captured.clear()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bfloat16):
                if start == 0:
                    with FlopCounterMode(display=False) as counter:
                        out = model(xb)
                    flops = float(counter.get_total_flops()) * len(x) / len(xb)
                else:
                    out = model(xb)
            if not captured or captured[-1][1] is not out:
                raise ConfigError(f"gradmatch needs the model's output to be the output of its last nn.Linear "
                                  f"({name!r}); this model computes its output after that layer")
            h = captured[-1][0]
            if h.dim() != 2:
                raise ConfigError(f"gradmatch needs 2-D inputs (batch, features) to the last layer {name!r}, "
                                  f"got shape {tuple(h.shape)}")
            if H is None:  # written in place: no concatenation copies of an (N, d) matrix
                H = torch.ones(len(x), h.shape[1] + 1, device=h.device)
            H[start:start + len(h), :-1] = h
            gs.append(logit_gradients(out.float(), yb, loss_fn))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return H, torch.cat(gs), flops


def _channels_last(module, inputs, output):
    return output.contiguous(memory_format=torch.channels_last) if output.dim() == 4 else output


def logit_gradients(z: torch.Tensor, y: torch.Tensor, loss_fn=None) -> torch.Tensor:
    """Per-example ``∂loss_i/∂z_i`` (N, C)."""
    if loss_fn is None or loss_fn is F.cross_entropy:
        if y.dtype != torch.long or y.dim() != 1:
            raise ConfigError("gradmatch with cross-entropy needs integer class labels of shape (N,)")
        g = torch.softmax(z.float(), dim=1)
        g[torch.arange(len(y)), y] -= 1.0
        return g
    with torch.enable_grad():
        z = z.detach().float().requires_grad_(True)
        try:
            loss = loss_fn(z, y, reduction="sum")
        except TypeError:
            raise ConfigError("gradmatch needs a loss_fn that accepts reduction='sum'") from None
        (g,) = torch.autograd.grad(loss, z)
    return g


# -- pools and their Gram matrices -----------------------------------------------------------
def make_pools(labels: torch.Tensor | None, n: int, pool_size: int, generator: torch.Generator) -> torch.Tensor:
    """Candidate pools (P, n_max) of indices, padded with -1: one per class (all samples when
    `labels` is None), classes larger than `pool_size` split into near-equal random chunks."""
    groups = [torch.arange(n)] if labels is None else \
        [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    pools = []
    for idx in groups:
        chunks = -(-len(idx) // pool_size)
        idx = idx[torch.randperm(len(idx), generator=generator)] if chunks > 1 else idx
        pools += list(torch.tensor_split(idx, chunks))
    width = max(len(p) for p in pools)
    out = torch.full((len(pools), width), -1, dtype=torch.long)
    for i, p in enumerate(pools):
        out[i, :len(p)] = p
    return out


def gather_pools(H: torch.Tensor, G: torch.Tensor, pools: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pool copies (P, n, ·) of `H` and `G`, zero rows where a pool is padded."""
    pad = pools < 0
    Hp, Gp = H[pools.clamp(min=0)], G[pools.clamp(min=0)]
    Hp[pad], Gp[pad] = 0.0, 0.0
    return Hp, Gp


def pool_gram(Hp: torch.Tensor, Gp: torch.Tensor) -> torch.Tensor:
    """Gram matrices (P, n, n) of the last-layer gradients of each pool (from `gather_pools` of
    `last_layer_features`'s H = [h, 1] and G); padding rows are zero."""
    return torch.bmm(Gp, Gp.transpose(1, 2)) * torch.bmm(Hp, Hp.transpose(1, 2))


def pool_budgets(sizes: torch.Tensor, fraction: float) -> torch.Tensor:
    """Split ``round(fraction·Σ sizes)`` among pools in proportion to their sizes (largest remainder)."""
    exact = fraction * sizes.double()
    budget = exact.floor().long()
    short = max(1, round(fraction * int(sizes.sum()))) - int(budget.sum())
    if short > 0:
        budget[torch.argsort(exact - budget, descending=True)[:short]] += 1
    return budget


def gram_flops(pools: torch.Tensor, d: int, c: int) -> float:
    """Multiply-adds ×2 of `pool_gram`."""
    p, n = pools.shape
    return 2.0 * p * n * n * (d + c)


# -- orthogonal matching pursuit -------------------------------------------------------------
def omp_gram(K: torch.Tensor, c: torch.Tensor, budget: torch.Tensor, *, lam: torch.Tensor | float = 0.0,
             valid: torch.Tensor | None = None, bb: torch.Tensor | None = None, tol: float = 1e-6,
             positive: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Batched OMP on Gram matrices: for each pool p, choose at most ``budget[p]`` columns S and
    weights w ≥ 0 minimizing ``‖Σ_S wᵢ aᵢ − b‖² + lam·‖w‖²``, given ``K = AᵀA`` (P, n, n) and
    ``c = Aᵀb`` (P, n).

    Each step adds the column most correlated with the residual (positively when `positive`),
    extends a Cholesky factor of ``K_SS + lam·I`` by one row and re-solves for the weights. A pool
    stops at its budget, when no column correlates positively, or when the relative residual
    ``‖r‖/‖b‖`` falls below `tol` (needs ``bb = ‖b‖²``). Negative weights are then removed and the
    rest re-solved until all are non-negative. Returns (indices (P, k) with -1 for none, weights
    (P, k), flops).
    """
    P, n = c.shape
    dtype, dev = K.dtype, K.device
    lam = torch.as_tensor(lam, dtype=dtype, device=dev).expand(P)
    avail = torch.ones(P, n, dtype=torch.bool, device=dev) if valid is None else valid.clone()
    budget = budget.to(dev)
    kmax = int(budget.max())
    rows = torch.arange(P, device=dev)
    KS = torch.zeros(P, kmax, n, dtype=dtype, device=dev)     # K[S_t, :] for the chosen columns
    L = torch.zeros(P, kmax, kmax, dtype=dtype, device=dev)   # Cholesky factor of K_SS + lam I
    cS = torch.zeros(P, kmax, dtype=dtype, device=dev)
    x = torch.zeros(P, kmax, dtype=dtype, device=dev)
    sel = torch.full((P, kmax), -1, dtype=torch.long, device=dev)
    done = budget <= 0
    flops = 0.0
    for t in range(kmax):
        proj = c - torch.bmm(x[:, None, :t], KS[:, :t]).squeeze(1) if t else c.clone()
        score = proj if positive else proj.abs()
        score = score.masked_fill(~avail, -torch.inf)
        best, j = score.max(dim=1)
        if bb is not None and t:
            resid2 = bb - (x[:, :t] * cS[:, :t]).sum(1) - lam * (x[:, :t] ** 2).sum(1)
            done |= resid2 <= (tol ** 2) * bb
        done |= (t >= budget) | ~(best > 0)
        if bool(done.all()):
            break
        act = ~done
        col = torch.where(act[:, None], K[rows, j], 0.0)
        KS[:, t] = col
        v = torch.where(act[:, None], KS[rows, :t, j], 0.0) if t else None
        diag = torch.where(act, K[rows, j, j] + lam, 1.0)
        if t:
            l = torch.linalg.solve_triangular(L[:, :t, :t], v[..., None], upper=False).squeeze(-1)
            L[:, t, :t] = l
            diag = diag - (l * l).sum(1)
        L[:, t, t] = diag.clamp(min=torch.finfo(dtype).tiny).sqrt()
        cS[:, t] = torch.where(act, c[rows, j], 0.0)
        x[:, :t + 1] = torch.cholesky_solve(cS[:, :t + 1, None], L[:, :t + 1, :t + 1]).squeeze(-1)
        sel[:, t] = torch.where(act, j, -1)
        avail[rows, j] &= done  # chosen now: unavailable (finished pools keep their mask)
        flops += 2.0 * P * n * (t + 1) + 4.0 * P * (t + 1) ** 2
    k = int((sel >= 0).sum(1).max()) if bool((sel >= 0).any()) else 0
    sel, x = sel[:, :k], x[:, :k]
    if positive and k:
        x = _nonnegative(K, c, sel, x, lam)
    x = torch.where(sel >= 0, x, 0.0)
    return sel, x, flops


def principal_submatrix(K: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """``K[p][S_p][:, S_p]`` (P, k, k) for the chosen indices `sel` (-1 entries give junk rows)."""
    P, k = sel.shape
    idx = sel.clamp(min=0)
    rows = torch.gather(K, 1, idx[:, :, None].expand(P, k, K.shape[2]))
    return torch.gather(rows, 2, idx[:, None, :].expand(P, k, k))


def _nonnegative(K, c, sel, x, lam):
    """Drop negative weights and re-solve on the remaining columns until none is negative."""
    chosen = sel >= 0
    keep = chosen & (x > 0)
    if bool((keep == chosen).all()):
        return x
    k = sel.shape[1]
    Kss = principal_submatrix(K, sel)
    cs = torch.gather(c, 1, sel.clamp(min=0))
    eye = torch.eye(k, dtype=K.dtype, device=K.device)
    for _ in range(k):
        m = keep.to(K.dtype)
        # Dropped columns become identity rows with a zero right-hand side: their weight is 0.
        A = Kss * m[:, :, None] * m[:, None, :] + eye * (lam[:, None, None] * m[:, None, :] + (1 - m)[:, None, :])
        x = torch.linalg.solve(A, (cs * m)[..., None]).squeeze(-1)
        negative = keep & (x <= 0)
        if not bool(negative.any()):
            break
        keep &= ~negative
    return torch.where(keep, x, 0.0)
