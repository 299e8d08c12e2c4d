"""Graph networks: node-classification tasks (``karate``, ``sbm``) and EGC with its baselines.

Paper: Tailor, Opolka, Liò, Lane, "Adaptive Filters and Aggregator Fusion for Efficient Graph
Convolutions" (HAET 2021; arXiv 2104.01481). The layers are torch_geometric's (`EGConv`,
`GCNConv`, `GATConv`, `GATv2Conv`, `GINConv`); haet adds the tasks, the graph input each layer is
efficient with (`haet.graph.adjacency`), parameter-matched models (`haet.graph.models`) and the
measurements. torch_geometric is imported only when a graph task loads or a graph model is built;
without it the error says to install the ``graph`` extra.
"""

from __future__ import annotations

from ..core.errors import ConfigError


def require_pyg():
    """torch_geometric, or a one-line ConfigError naming the extra to install."""
    try:
        import torch_geometric
    except ImportError:
        raise ConfigError("graph tasks and models need the graph extra: pip install 'haet[graph]'") from None
    return torch_geometric
