"""EGC and its baselines for node classification, at matched parameter counts.

Every model is ``conv → layer norm → ReLU → dropout`` twice (the EGC reference code normalizes
after each convolution too; without it EGC-M's unnormalized sum and max stall at Adam lr 0.01),
then a linear classifier, built from
torch_geometric's layers and fed the input each layer is efficient with (`haet.graph.adjacency`):

| model | layer | graph input |
|---|---|---|
| ``egc-s`` | `EGConv`, H=8 heads, B=4 bases, symnorm | ``adj_norm`` (fused sparse product) |
| ``egc-m`` | `EGConv`, H=4, B=4, aggregators sum + std + max fused | ``adj`` (fused sparse products) |
| ``gcn`` | `GCNConv` (normalize=False: the adjacency is normalized once) | ``adj_norm`` |
| ``gat`` | `GATConv`, 8 heads, concatenated | ``edge_index`` (attention is per edge) |
| ``gatv2`` | `GATv2Conv`, 8 heads, concatenated | ``edge_index`` |
| ``gin`` | `GINConv`, MLP of two linear layers, sum over N(i) ∪ {i} plus x_i (ε = 0) | ``adj`` |

EGC-S's symnorm aggregation is a sum over the symmetric-normalized adjacency, which the task
computes once per graph; EGConv's own "symnorm" would re-normalize at every step and keep a new
E-sized value tensor for backward. EGC-M uses "sum" (the paper's "add") rather than "symnorm" for
the same reason (EGConv also copies the adjacency to mix symnorm with other aggregators).

Parameter matching: EGC-S at hidden width 64 sets the budget for the task's input and class
counts; every other model takes the hidden width (a multiple of its head count) whose parameter
count is nearest to it (`matched_hidden`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import require_pyg

REFERENCE = "egc-s"
REFERENCE_HIDDEN = 64    # EGC-S width whose parameter count every other model matches
LAYERS = 2
DROPOUT = 0.5
#: model -> (graph input key, hidden-width step: the head count the width must be a multiple of)
KINDS: dict[str, tuple[str, int]] = {
    "egc-s": ("adj_norm", 8), "egc-m": ("adj", 4), "gcn": ("adj_norm", 1),
    "gat": ("edge_index", 8), "gatv2": ("edge_index", 8), "gin": ("adj", 1),
}


class GraphNet(nn.Module):
    """Graph convolutions with layer norm, ReLU and dropout, then a linear classifier over each node."""

    def __init__(self, convs: list[nn.Module], hidden: int, num_classes: int, graph_key: str,
                 dropout: float = DROPOUT) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        # Layer norm, not batch norm: with whole-graph batches and 4 labelled karate members,
        # batch norm cost EGC-S half its karate accuracy (0.83 -> 0.37 at seed 0).
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in convs)
        self.head = nn.Linear(hidden, num_classes)
        self.graph_key, self.dropout, self.hidden = graph_key, dropout, hidden

    def forward(self, graph: dict) -> torch.Tensor:
        h, adj = graph["x"], graph[self.graph_key]
        for conv, norm in zip(self.convs, self.norms):
            h = F.dropout(F.relu(norm(conv(h, adj))), self.dropout, self.training)
        return self.head(h)


def graph_model(kind: str, in_features: int, num_classes: int, hidden: int | None = None) -> GraphNet:
    """Model `kind` (a key of KINDS); `hidden` None = the width matched to EGC-S's parameter count."""
    if hidden is None:
        hidden = matched_hidden(kind, in_features, num_classes)
    widths = [in_features] + [hidden] * LAYERS
    convs = [_conv(kind, a, b) for a, b in zip(widths, widths[1:])]
    return GraphNet(convs, hidden, num_classes, KINDS[kind][0])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_hidden(kind: str, in_features: int, num_classes: int) -> int:
    """The hidden width (a multiple of the layer's head count) whose parameter count is nearest
    EGC-S's at width 64; counts grow with the width, so a bisection finds it."""
    target = count_params(graph_model(REFERENCE, in_features, num_classes, REFERENCE_HIDDEN))
    step = KINDS[kind][1]
    lo, hi = 1, 64  # in steps
    while count_params(graph_model(kind, in_features, num_classes, hi * step)) < target:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_params(graph_model(kind, in_features, num_classes, mid * step)) < target:
            lo = mid
        else:
            hi = mid
    gap = {k: abs(count_params(graph_model(kind, in_features, num_classes, k * step)) - target) for k in (lo, hi)}
    return min(gap, key=gap.get) * step


def _conv(kind: str, c_in: int, c_out: int) -> nn.Module:
    require_pyg()
    from torch_geometric import nn as gnn

    if kind == "egc-s":
        return gnn.EGConv(c_in, c_out, aggregators=["sum"], num_heads=8, num_bases=4, add_self_loops=False)
    if kind == "egc-m":
        return gnn.EGConv(c_in, c_out, aggregators=["sum", "std", "max"], num_heads=4, num_bases=4,
                          add_self_loops=False)
    if kind == "gcn":
        return gnn.GCNConv(c_in, c_out, add_self_loops=False, normalize=False)
    if kind == "gat":
        return gnn.GATConv(c_in, c_out // 8, heads=8, add_self_loops=False)
    if kind == "gatv2":
        return gnn.GATv2Conv(c_in, c_out // 8, heads=8, add_self_loops=False)
    if kind == "gin":
        return gnn.GINConv(nn.Sequential(nn.Linear(c_in, c_out), nn.ReLU(), nn.Linear(c_out, c_out)))
    raise ValueError(f"unknown graph model {kind!r}")


def _builder(kind: str) -> Callable[[tuple[int, ...], int], nn.Module]:
    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return graph_model(kind, input_shape[0], num_classes)

    build.__name__ = kind.replace("-", "_")
    return build


#: Registered in `haet.models.MODELS`: name -> (builder(input_shape, num_classes), description).
GRAPH_MODELS = {
    "egc-s": (_builder("egc-s"), "EGC-S (torch_geometric EGConv, H=8, B=4, symnorm) on a CSR adjacency; graph tasks"),
    "egc-m": (_builder("egc-m"), "EGC-M (EGConv, H=4, B=4, sum+std+max fused) on a CSR adjacency; graph tasks"),
    "gcn": (_builder("gcn"), "GCN (GCNConv) on the normalized CSR adjacency, parameters matched to egc-s"),
    "gat": (_builder("gat"), "GAT (GATConv, 8 heads) on edge_index, parameters matched to egc-s"),
    "gatv2": (_builder("gatv2"), "GATv2 (GATv2Conv, 8 heads) on edge_index, parameters matched to egc-s"),
    "gin": (_builder("gin"), "GIN (GINConv, 2-layer MLP) on the CSR adjacency, parameters matched to egc-s"),
}
