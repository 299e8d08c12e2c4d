"""The grouped sparse projection's solver (`haet.methods.gsp`): one dual variable per group, found
by a safeguarded Newton method with segmented sums over contiguous vectors.

For vectors c_i of lengths n_i, beta_i = 1 / (sqrt(n_i) - 1) and a threshold mu shared by a group,
z_i(mu) = (|c_i| - mu * beta_i)_+ / norm and g(mu) = sum_i beta_i |z_i(mu)|_1, a decreasing function
of mu; the group's average Hoyer sparsity equals the target s where g(mu) = sum_i beta_i sqrt(n_i) - r s.
"""

from __future__ import annotations

import warnings

import torch

from ..core.errors import ConfigError


def _layout(groups: list[list[torch.Tensor]]):
    """Lengths of the vectors and vector counts of the groups (entries are laid out contiguously)."""
    mats = [m for g in groups for m in g]
    for m in mats:
        if m.dim() != 2 or m.shape[1] < 2:
            raise ConfigError(f"GSP needs vectors of at least 2 entries, got shape {tuple(m.shape)}")
    device = mats[0].device
    lengths = torch.tensor([m.shape[1] for m in mats for _ in range(m.shape[0])], device=device)
    counts = torch.tensor([sum(m.shape[0] for m in g) for g in groups], device=device)
    return lengths, counts


def project_groups(groups: list[list[torch.Tensor]], target: float, tol: float, max_iter: int,
                    mu0: list[float] | None = None):
    """Project each group (a list of 2-D tensors whose rows are vectors) to average sparsity `target`.

    All groups are solved together: one vectorized safeguarded Newton iteration updates every
    group's dual variable (segmented sums over contiguous vectors), so the cost is a few passes
    over all entries whatever the number of groups. `mu0`: a starting point per group (e.g. the
    last solution, during training), else 0.
    """
    lengths, counts = _layout(groups)
    mats = [m for g in groups for m in g]
    dtype = torch.promote_types(mats[0].dtype, torch.float32)   # float32 weights solve in float32
    c = torch.cat([m.detach().reshape(-1) for m in mats]).to(dtype)
    a = c.abs()
    n = lengths.to(dtype)
    tiny = torch.finfo(dtype).tiny
    beta = 1.0 / (n.sqrt() - 1.0)
    per_elem = torch.repeat_interleave(beta, lengths)                           # beta of each entry's vector

    def to_vectors(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        return torch.segment_reduce(x, reduce, lengths=lengths)

    def to_groups(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        return torch.segment_reduce(x, reduce, lengths=counts)

    r = counts.to(dtype)
    k = to_groups(beta * n.sqrt()) - r * target                                 # g(mu*) = k <=> mean sp = target
    up = to_groups(to_vectors(a, "max") / beta, "max")                          # beyond: every vector 1-sparse

    def g_and_slope(mu: torch.Tensor):
        xp = (a - _expand(mu, counts, lengths) * per_elem).clamp_min(0)
        s1, s2, m = to_vectors(xp), to_vectors(xp * xp), to_vectors((xp > 0).to(dtype))
        pos, root = s2 > 0, s2.sqrt().clamp_min(tiny)
        l1 = torch.where(pos, s1 / root, torch.ones_like(s1))                      # |z_i|_1 (1 when 1-sparse)
        dl1 = torch.where(pos, beta * (s1 * s1 / (root * root * root) - m / root), torch.zeros_like(s1))
        return to_groups(beta * l1), to_groups(beta * dl1)

    zero = torch.zeros_like(k)
    g, slope = g_and_slope(zero)
    evaluations, iterations = 1, 0
    unchanged = g <= k                                       # already at least as sparse as the target
    mu, lo = zero.clone(), zero.clone()
    if mu0 is not None and not bool(unchanged.all()):       # warm start: bracket the root with mu0
        start = torch.tensor(mu0, dtype=dtype, device=a.device).clamp(0, None)
        start = torch.where(unchanged | (start >= up), zero, start)
        g0, slope0 = g, slope
        g, slope = g_and_slope(start)
        evaluations += 1
        mu = start
        lo = torch.where(g > k, start, lo)
        up = torch.where((g <= k) & (start > 0), start, up)
        g, slope = torch.where(start > 0, g, g0), torch.where(start > 0, slope, slope0)
    residual_before = (g - k).abs()
    while iterations < max_iter:
        todo = ~unchanged & ((g - k).abs() > tol * r)
        if not bool(todo.any()):
            break
        iterations += 1
        newton = mu + (k - g) / torch.where(slope < 0, slope, torch.full_like(slope, -tiny))
        bisect = (lo + up) / 2
        # Newton on a decreasing function; bisect when it leaves the bracket, and every other step
        # when the residual has not halved in two steps (so convergence is linear at worst).
        use_bisect = ~torch.isfinite(newton) | (newton <= lo) | (newton >= up)
        if iterations % 2 == 0:
            use_bisect |= (g - k).abs() > residual_before / 2
            residual_before = (g - k).abs()
        mu = torch.where(todo, torch.where(use_bisect, bisect, newton), mu)
        g, slope = g_and_slope(mu)
        evaluations += 1
        too_dense = g > k
        lo = torch.where(todo & too_dense, mu, lo)
        up = torch.where(todo & ~too_dense, mu, up)
    converged = not bool((~unchanged & ((g - k).abs() > tol * r)).any())
    if not converged:       # keep the side whose average sparsity is at least the target
        mu = torch.where(unchanged | ((g - k).abs() <= tol * r), mu, up)
        warnings.warn("gsp: the projection did not reach the tolerance (g is discontinuous at ties); "
                      "returning the nearest sparser point", stacklevel=3)
    mu = torch.where(unchanged, zero, mu)
    projected = _apply(c, a, _expand(mu, counts, lengths) * per_elem, lengths)
    projected = torch.where(_expand(unchanged, counts, lengths), c, projected)
    out, offset = [], 0
    for grp in groups:
        out.append([])
        for m in grp:
            out[-1].append(projected[offset:offset + m.numel()].reshape(m.shape).to(m.dtype))
            offset += m.numel()
    return out, {"mu": mu.tolist(), "iterations": iterations, "evaluations": evaluations, "converged": converged}


def _expand(per_group: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A value per group repeated for every entry of the group's vectors."""
    return torch.repeat_interleave(torch.repeat_interleave(per_group, counts), lengths)


def _apply(c, a, threshold, lengths):
    """sign(c) * <a, z> * z with z = (a - threshold)_+ normalized (the largest entry when empty)."""
    xp = (a - threshold).clamp_min(0)
    s2 = torch.segment_reduce(xp * xp, "sum", lengths=lengths)
    empty = s2 <= 0
    if bool(empty.any()):   # keep the first largest entry of each vector thresholded to nothing
        vec = torch.repeat_interleave(torch.arange(len(lengths), device=a.device), lengths)
        vec_max = torch.segment_reduce(a, "max", lengths=lengths)
        idx = torch.arange(len(a), device=a.device)
        first = torch.full((len(lengths),), len(a), device=a.device).scatter_reduce(
            0, vec, torch.where(a == vec_max[vec], idx, len(a)), "amin")
        xp = torch.where(empty[vec], (idx == first[vec]).to(a.dtype), xp)
        s2 = torch.where(empty, torch.ones_like(s2), s2)
    z = xp / torch.repeat_interleave(s2.sqrt(), lengths)
    alpha = torch.segment_reduce(a * z, "sum", lengths=lengths)
    return torch.sign(c) * torch.repeat_interleave(alpha, lengths) * z
