"""The graph input of haet's graph models: one dict holding every representation a layer needs.

A message-passing layer given ``edge_index`` materializes one message per edge and autograd keeps
those (E × F) tensors for backward: memory grows with edges. Layers that implement
``message_and_aggregate`` (EGC, GCN, GIN) take a fused sparse-matrix product instead when given a
sparse adjacency; only node-sized tensors are then saved (plus the adjacency itself, which is
the data). torch_geometric 2.8.1 without torch_sparse has no ``SparseTensor``; it fuses for a
``torch.sparse_csr`` tensor (CPU for every reduction; CUDA for sum/mean only). Its ``EdgeIndex``
does not take EGConv's fused path (EGConv does not declare fused EdgeIndex support in 2.8.1).

Keys of `graph_input`'s dict (self-loops added once, here, so layers run with
``add_self_loops=False``):

- ``x``: node features (V, F).
- ``edge_index``: (2, E + V) int64, for attention layers (GAT, GATv2), which need per-edge scores.
- ``adj``: CSR adjacency with unit values (target rows, source columns), for sum/mean/max/std;
  int32 indices (8 bytes per edge with the values).
- ``adj_norm``: the same pattern with symmetric-normalized values D^-1/2 (A + I) D^-1/2, computed
  once per graph: a sum over it *is* EGC's "symnorm" aggregator and GCN's propagation, so no layer
  re-normalizes (and saves a fresh E-sized value tensor) at every step.
"""

from __future__ import annotations

import warnings

import torch

from . import require_pyg


def graph_input(x: torch.Tensor, edge_index: torch.Tensor, num_nodes: int | None = None) -> dict:
    """The dict a haet graph model takes, from features and an (undirected) ``edge_index``."""
    require_pyg()
    from torch_geometric.utils import add_remaining_self_loops, to_torch_csr_tensor

    n = x.size(0) if num_nodes is None else num_nodes
    loops, _ = add_remaining_self_loops(edge_index, num_nodes=n)
    # CSR rows are targets: row i lists the sources j whose features flow into node i.
    with warnings.catch_warnings():  # PyTorch calls its CSR support "beta" at every construction
        warnings.simplefilter("ignore", UserWarning)
        csr = to_torch_csr_tensor(loops.flip(0), size=(n, n))
        # Fresh int32 index arrays: 4 bytes per edge instead of 8, and no view into the 2 x E
        # edge_index storage (which a saved adjacency would otherwise keep alive whole).
        index = torch.int32 if n < 2**31 - 1 and csr._nnz() < 2**31 - 1 else torch.int64
        adj = torch.sparse_csr_tensor(csr.crow_indices().to(index), csr.col_indices().to(index), csr.values(),
                                      (n, n))
        adj_norm = symnorm(adj)
    return {"x": x, "edge_index": loops, "adj": adj, "adj_norm": adj_norm}


def symnorm(adj: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of a CSR adjacency, sharing its index storage (degrees from the rows)."""
    crow, col = adj.crow_indices(), adj.col_indices()
    deg = (crow[1:] - crow[:-1]).to(adj.values().dtype)
    inv_sqrt = deg.pow(-0.5).masked_fill(deg == 0, 0.0)
    rows = torch.repeat_interleave(torch.arange(adj.size(0), device=crow.device), crow[1:] - crow[:-1])
    values = inv_sqrt[rows] * adj.values() * inv_sqrt[col]
    return torch.sparse_csr_tensor(crow, col, values, adj.shape)


def graph_stats(graph: dict) -> dict:
    """Nodes and directed edges (self-loops excluded) of a `graph_input` dict."""
    ei = graph["edge_index"]
    return {"nodes": graph["x"].size(0), "edges": int((ei[0] != ei[1]).sum())}
