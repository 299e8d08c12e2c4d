"""A linear layer in tensor-train (TT-matrix) format, with optional fake-quantized cores.

The weight W (in_features × out_features, ``y = x W + b``) is never stored. With
``in_features = m_1···m_d`` and ``out_features = n_1···n_d`` it is

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ··· G_d[:, i_d, j_d, :]

with cores G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1 (Oseledets, SIAM J. Sci. Comput.
2011). The forward contracts the input with one core at a time, a matrix product per core, so
its cost is the analytic count of `TensorTrainLinear.flops`:

    forward  = Σ_k 2 B (n_1···n_{k-1}) (m_{k+1}···m_d) r_{k-1} m_k n_k r_k
    backward = 2 × forward (the input gradient of core 1 only when the input needs one)

TT-SVD initialization from a dense weight uses tensorly's ``tensor_train_matrix`` (the pytorch
backend, float64). tensorly-torch's ``FactorizedLinear`` is not used: its 'BlockTT' needs as many
input as output modes, its default init leaves the weight far too small, its forward goes through
einsum (slow without opt_einsum), and it has neither rank pruning nor quantized cores.

``bits`` (2–16) fake-quantizes each core in the forward, symmetric, one float scale per core,
with straight-through gradients: the stored master cores stay float32 (what is trained), the
forward sees the values a ``bits``-bit device would store.

Rank slices: slice j of internal edge k is the pair (G_k[..., j], G_{k+1}[j, ...]); removing it
(`keep_slices`) lowers r_k by one and deletes exactly that slice's term of W. Each edge carries a
buffer ``rank_scale_k`` (r_k variances λ_k; core k's entries have prior variance λ_{k-1,a} λ_{k,b},
λ_0 = λ_d = 1), which `haet.methods.tensor_train` learns; they travel with the model's state.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["TensorTrainLinear", "fake_quantize", "tt_modes", "full_ranks", "tt_svd", "tt_round"]


def fake_quantize(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `t` to a symmetric `bits`-bit grid (scale = max|t| / (2^(bits-1) - 1)); identity gradient."""
    qmax = 2 ** (bits - 1) - 1
    scale = t.detach().abs().max().clamp_min(1e-12) / qmax
    q = torch.round(t.detach() / scale).clamp_(-qmax, qmax) * scale
    return t + (q - t.detach())


def tt_modes(n: int, d: int) -> tuple[int, ...]:
    """Factor `n` into `d` modes, as even as the prime factors allow (1s where there are too few)."""
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    buckets = [1] * d
    for q in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= q
    ordered = sorted(buckets, reverse=True)  # largest first and last: the r² middle cores get the small modes
    return tuple(ordered[0::2] + ordered[1::2][::-1])


def full_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """The internal ranks at which the TT format represents any matrix exactly."""
    sizes = [m * n for m, n in zip(in_modes, out_modes)]
    return tuple(min(math.prod(sizes[:k + 1]), math.prod(sizes[k + 1:])) for k in range(len(sizes) - 1))


def tt_svd(weight: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int],
           ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD of a dense (in_features × out_features) matrix: cores (r_{k-1}, m_k, n_k, r_k)."""
    try:
        import tensorly as tl
        from tensorly.decomposition import tensor_train_matrix
    except ImportError:  # pragma: no cover - tensorly is a base dependency
        raise ImportError("TT-SVD needs tensorly: pip install 'tensorly==0.10.0' (a dependency of haet)") from None
    tensor = weight.detach().to(torch.float64).reshape(*in_modes, *out_modes)
    with tl.backend_context("pytorch"):
        cores = tensor_train_matrix(tensor, rank=[1, *ranks, 1])
    return [c.to(weight.dtype) for c in cores]


@torch.no_grad()
def tt_round(cores: Sequence[torch.Tensor], threshold: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """TT-rounding (Oseledets 2011): orthogonalize right to left, then truncate left to right.

    At edge k the singular values σ of W's unfolding there are exact (the cores to its left are
    left-orthogonal, to its right right-orthogonal); directions with σ < threshold·σ_max are
    dropped, which changes W by sqrt(Σ dropped σ²) in Frobenius norm for one edge (at most the
    root of the sum over all edges). The cores are then rescaled to equal norms (W unchanged).
    Returns (cores, the σ of each edge before truncation).
    """
    cores = [c.to(torch.float64) for c in cores]
    d = len(cores)
    for k in range(d - 1, 0, -1):                                 # right-orthogonalize cores 2..d
        r0, m, n, r1 = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(r0, -1).t())
        cores[k] = q.t().reshape(-1, m, n, r1)
        cores[k - 1] = torch.einsum("amnb,cb->amnc", cores[k - 1], r)
    spectra = []
    for k in range(d - 1):                                        # truncate left to right
        r0, m, n, r1 = cores[k].shape
        u, s, vh = torch.linalg.svd(cores[k].reshape(-1, r1), full_matrices=False)
        spectra.append(s.to(torch.float32))
        keep = max(1, int((s >= threshold * s[0]).sum())) if threshold > 0 else len(s)
        cores[k] = u[:, :keep].reshape(r0, m, n, keep)
        cores[k + 1] = torch.einsum("ab,bmnc->amnc", s[:keep, None] * vh[:keep], cores[k + 1])
    norms = torch.stack([c.norm() for c in cores])
    balance = norms.log().mean().exp()
    return [(c * (balance / f)).to(torch.float32) for c, f in zip(cores, norms)], spectra


class TensorTrainLinear(nn.Module):
    """``y = x W + b`` with W in TT-matrix format; see the module docstring.

    Args:
        in_modes, out_modes: factorizations of in_features and out_features, same length d.
        ranks: the d-1 internal TT ranks (an int: the same for all), clipped to `full_ranks`.
        bits: fake-quantize the cores to this many bits in the forward (None: float32).
        bias: learn an additive bias (dense, out_features).
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], ranks: int | Sequence[int],
                 bits: int | None = None, bias: bool = True) -> None:
        super().__init__()
        in_modes, out_modes = tuple(int(m) for m in in_modes), tuple(int(n) for n in out_modes)
        if len(in_modes) != len(out_modes) or not in_modes or min(in_modes + out_modes) < 1:
            raise ValueError(f"in_modes {in_modes} and out_modes {out_modes} must be positive and of equal length")
        if bits is not None and not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16] or None, got {bits}")
        d = len(in_modes)
        ranks = [int(ranks)] * (d - 1) if isinstance(ranks, int) else [int(r) for r in ranks]
        if len(ranks) != d - 1 or min(ranks, default=1) < 1:
            raise ValueError(f"ranks must be {d - 1} positive integers, got {ranks}")
        ranks = [min(r, f) for r, f in zip(ranks, full_ranks(in_modes, out_modes))]
        self.in_modes, self.out_modes, self.bits = in_modes, out_modes, bits
        self.in_features, self.out_features = math.prod(in_modes), math.prod(out_modes)
        bounds = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(bounds[k], in_modes[k], out_modes[k], bounds[k + 1])) for k in range(d))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        for k, r in enumerate(ranks):
            self.register_buffer(f"rank_scale_{k}", torch.ones(r))
        self.reset_parameters()

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(c.shape[-1] for c in self.cores[:-1])

    def rank_scales(self) -> list[torch.Tensor]:
        """The prior variances of each internal edge's slices (buffers ``rank_scale_k``)."""
        return [getattr(self, f"rank_scale_{k}") for k in range(len(self.cores) - 1)]

    def reset_parameters(self) -> None:
        """Random cores whose rebuilt W has nn.Linear's weight variance, 1 / (3 in_features).

        Entries N(0, σ²) give Var W = (r_1···r_{d-1}) σ^(2d); a TT init that ignores this makes W
        far too small (tensorly-torch's default: early epochs near chance).
        """
        target = 1.0 / (3 * self.in_features)
        std = (target / math.prod(self.ranks)) ** (1 / (2 * len(self.cores)))
        for core in self.cores:
            nn.init.normal_(core, 0.0, std)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_modes: Sequence[int], out_modes: Sequence[int],
                    ranks: int | Sequence[int], bits: int | None = None) -> "TensorTrainLinear":
        """Initialize by TT-SVD of `linear`'s weight (exact at full rank, the best rank-r truncation per step)."""
        layer = cls(in_modes, out_modes, ranks, bits=bits, bias=linear.bias is not None)
        layer.to(linear.weight.device)
        cores = tt_svd(linear.weight.t(), layer.in_modes, layer.out_modes, layer.ranks)
        with torch.no_grad():
            for core, value in zip(layer.cores, cores):
                core.copy_(value)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def quantized_cores(self) -> list[torch.Tensor]:
        return [c if self.bits is None else fake_quantize(c, self.bits) for c in self.cores]

    def to_dense(self) -> torch.Tensor:
        """The (in_features × out_features) matrix the cores represent (after quantization)."""
        cores = self.quantized_cores()
        w = cores[0].reshape(-1, cores[0].shape[-1])             # rows (i_1, j_1)
        for core in cores[1:]:
            w = w @ core.reshape(core.shape[0], -1)               # rows (i_<k, j_<k), cols (i_k, j_k, r_k)
            w = w.reshape(-1, core.shape[-1])
        d = len(cores)
        w = w.reshape(*[s for m, n in zip(self.in_modes, self.out_modes) for s in (m, n)])
        return w.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        batch = math.prod(lead)
        t = x.reshape(batch, 1, self.in_features)               # (B·N_<k, r_{k-1}·m_k, M_>k) at k = 1
        for k, core in enumerate(self.quantized_cores()):
            r_in, m, n, r_out = core.shape
            rest = t.shape[-1]
            t = t.reshape(-1, r_in * m, rest // m).transpose(1, 2).reshape(-1, r_in * m)
            t = t @ core.reshape(r_in * m, n * r_out)              # (B·N_<k·M_>k, n_k·r_k)
            t = t.reshape(-1, rest // m, n, r_out).permute(0, 2, 3, 1)  # (B·N_<k, n_k, r_k, M_>k)
            t = t.reshape(-1, r_out, rest // m)
        out = t.reshape(*lead, self.out_features)
        return out + self.bias if self.bias is not None else out

    def flops(self, batch: int, input_requires_grad: bool = True) -> tuple[int, int]:
        """Analytic (forward, backward) FLOPs of the contraction for `batch` rows (a multiply-add = 2)."""
        d = len(self.cores)
        bounds = [1, *self.ranks, 1]
        per_core = [2 * batch * math.prod(self.out_modes[:k]) * math.prod(self.in_modes[k + 1:])
                    * bounds[k] * self.in_modes[k] * self.out_modes[k] * bounds[k + 1] for k in range(d)]
        forward = sum(per_core)
        return forward, 2 * forward - (0 if input_requires_grad else per_core[0])

    # -- rank adaptation ------------------------------------------------------------------------
    @torch.no_grad()
    def canonicalize_(self) -> None:
        """Rewrite the cores in TT-canonical form (`tt_round` without truncation; W unchanged up
        to float rounding): slice j of edge k is then the edge's j-th singular direction."""
        cores, _ = tt_round([c.detach() for c in self.cores], 0.0)
        if [c.shape for c in cores] == [c.shape for c in self.cores]:
            for core, value in zip(self.cores, cores):
                core.copy_(value)

    def edge_spectra(self) -> list[torch.Tensor]:
        """The singular values at each internal edge (of W unfolded there), from `tt_round`."""
        return tt_round([c.detach() for c in self.cores], 0.0)[1]

    def round_ranks(self, threshold: float) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """TT-rounding: drop, at each edge, the directions with σ < threshold·σ_max.

        Only when some rank would drop are the cores replaced (by the rounded, norm-balanced
        ones, which represent the same W up to the dropped directions); returns (old, new) pairs.
        """
        cores, _ = tt_round([c.detach() for c in self.cores], threshold)
        if tuple(c.shape[-1] for c in cores[:-1]) == self.ranks:
            return []
        changed = []
        for k, value in enumerate(cores):
            old = self.cores[k]
            self.cores[k] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
            changed.append((old, self.cores[k]))
        for k, r in enumerate(self.ranks):  # a new basis: the slice variances start over
            setattr(self, f"rank_scale_{k}", self.cores[k].new_ones(r))
        return changed

    def keep_slices(self, edge: int, keep: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Keep only the slices `keep` (indices, ascending) of internal edge `edge`: cores `edge` and
        `edge + 1` lose the other slices, W loses exactly their terms; returns (old, new) pairs."""
        keep = keep.to(device=self.cores[edge].device)
        left, right = self.cores[edge], self.cores[edge + 1]
        new_left = nn.Parameter(left.detach().index_select(3, keep).contiguous(), requires_grad=left.requires_grad)
        new_right = nn.Parameter(right.detach().index_select(0, keep).contiguous(), requires_grad=right.requires_grad)
        self.cores[edge], self.cores[edge + 1] = new_left, new_right
        setattr(self, f"rank_scale_{edge}", getattr(self, f"rank_scale_{edge}").index_select(0, keep))
        return [(left, new_left), (right, new_right)]

    def keep_ranks(self, ranks: Sequence[int]) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Cut the cores to `ranks` (the leading indices): restores a saved shape before its values load."""
        bounds = [1, *ranks, 1]
        changed = []
        for k, old in enumerate(self.cores):
            if old.shape[0] != bounds[k] or old.shape[-1] != bounds[k + 1]:
                self.cores[k] = nn.Parameter(old.detach()[:bounds[k], :, :, :bounds[k + 1]].clone(),
                                             requires_grad=old.requires_grad)
                changed.append((old, self.cores[k]))
        for k, r in enumerate(ranks):
            setattr(self, f"rank_scale_{k}", getattr(self, f"rank_scale_{k}")[:r].clone())
        return changed

    def extra_repr(self) -> str:
        return (f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, bits={self.bits}, "
                f"bias={self.bias is not None}")
