"""Node-classification tasks on graphs that ship with torch_geometric or are generated: no download.

- ``karate``: Zachary's karate club (34 members, 4 communities, one-hot features), torch_geometric's
  ``KarateClub``: the classic semi-supervised split, one labelled member per community for
  training, the other 30 for testing.
- ``sbm``: a stochastic block model from ``torch_geometric.utils.stochastic_blockmodel_graph``
  (its ``StochasticBlockModelDataset`` class fails with the scikit-learn haet pins). The communities
  are the labels; each node's features are its block's mean (drawn once per block) plus Gaussian
  noise; train/val/test node masks are drawn from the seed. Parameters use the method syntax:
  ``--task sbm:nodes=2000,degree=50,blocks=5,features=32``.

A task's data is the whole graph as one batch: ``train = [(graph, y_train)]`` and
``test = [(graph, y_test, y_val)]``, where ``graph`` is a `haet.graph.adjacency.graph_input` dict
and each label vector holds -100 outside its mask, so the loss (`masked_cross_entropy`) and the
evaluation (`masked_eval`) see only their own nodes. One epoch is one full-graph step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.config import check_range
from ..core.errors import ConfigError
from . import require_pyg
from .adjacency import graph_input

IGNORE = -100  # label of a node outside a split's mask (cross_entropy's ignore_index)
GRAPH_MODELS = ("egc-s", "egc-m", "gcn", "gat", "gatv2", "gin")
MAX_SBM_NODES = 10_000  # the generator enumerates all V(V-1)/2 node pairs: ~1.6 GB at 10,000


@dataclass(frozen=True)
class SbmParams:
    nodes: int = 2000        # vertices V
    degree: float = 10.0     # expected neighbours per node
    blocks: int = 5          # communities = classes
    features: int = 32       # feature dimension
    intra: float = 0.5       # expected share of a node's edges inside its own block
    noise: float = 3.0       # std of the feature noise; block means are N(0, 1) per dimension / sqrt(features)
    train: float = 0.6       # share of nodes in the training mask
    val: float = 0.2         # share in the validation mask (the rest is the test mask)

    def __post_init__(self) -> None:
        check_range("nodes", self.nodes, 1, MAX_SBM_NODES, integer=True)
        check_range("blocks", self.blocks, 2, self.nodes, integer=True)
        check_range("degree", self.degree, 0, self.nodes, lo_open=True, hi_open=True)
        check_range("features", self.features, 1, 4096, integer=True)
        check_range("intra", self.intra, 0, 1)
        check_range("noise", self.noise, 0, None)
        check_range("train", self.train, 0, 1, lo_open=True, hi_open=True)
        check_range("val", self.val, 0, 1 - self.train, hi_open=True)
        p_in, p_out = self.edge_probabilities()
        if p_in > 1 or p_out > 1:
            raise ConfigError(f"degree={self.degree} with intra={self.intra} needs an edge probability above 1 "
                              f"for nodes={self.nodes}, blocks={self.blocks}; lower degree or intra")

    def block_sizes(self) -> list[int]:
        base, extra = divmod(self.nodes, self.blocks)
        return [base + (i < extra) for i in range(self.blocks)]

    def edge_probabilities(self) -> tuple[float, float]:
        """(within-block, between-block) probabilities giving the expected degree and intra share."""
        size = self.nodes / self.blocks
        p_in = self.intra * self.degree / max(size - 1, 1)
        p_out = (1 - self.intra) * self.degree / max(self.nodes - size, 1)
        return p_in, p_out


def sbm_graph(params: SbmParams, seed: int) -> tuple[dict, torch.Tensor]:
    """(graph_input dict, labels) of one seeded stochastic block model."""
    require_pyg()
    from torch_geometric.utils import stochastic_blockmodel_graph

    p_in, p_out = params.edge_probabilities()
    probs = torch.full((params.blocks, params.blocks), p_out)
    probs.fill_diagonal_(p_in)
    sizes = params.block_sizes()
    with torch.random.fork_rng():  # the generator draws from the global RNG; keep the caller's stream
        torch.manual_seed(seed)
        edge_index = stochastic_blockmodel_graph(sizes, probs)
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(params.blocks), torch.tensor(sizes))
    means = torch.randn(params.blocks, params.features, generator=g) / params.features ** 0.5
    x = means[labels] + params.noise / params.features ** 0.5 * torch.randn(params.nodes, params.features, generator=g)
    return graph_input(x, edge_index, params.nodes), labels


def split_labels(labels: torch.Tensor, seed: int, train: float, val: float) -> tuple[torch.Tensor, ...]:
    """(y_train, y_val, y_test): `labels` with IGNORE outside each seeded mask."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 1))
    n_train, n_val = round(train * len(labels)), round(val * len(labels))
    parts = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    return tuple(_masked(labels, idx) for idx in parts)


def load_sbm(params: SbmParams, seed: int, data_dir: str | None = None) -> tuple[list, list]:
    graph, labels = sbm_graph(params, seed)
    y_train, y_val, y_test = split_labels(labels, seed, params.train, params.val)
    return [(graph, y_train)], [(graph, y_test, y_val)]


def load_karate(seed: int, data_dir: str | None = None) -> tuple[list, list]:
    """KarateClub's fixed split: 4 labelled members (one per community) train, 30 test; no val."""
    require_pyg()
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    graph = graph_input(data.x, data.edge_index, data.num_nodes)
    train_idx = data.train_mask.nonzero().flatten()
    test_idx = (~data.train_mask).nonzero().flatten()
    none = torch.full_like(data.y, IGNORE)
    return [(graph, _masked(data.y, train_idx))], [(graph, _masked(data.y, test_idx), none)]


def masked_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the nodes of the mask (labels IGNORE elsewhere)."""
    return F.cross_entropy(outputs, targets, ignore_index=IGNORE, reduction=reduction)


def masked_eval(model: torch.nn.Module, eval_data, device) -> dict:
    """Test accuracy and loss over the test mask, and ``graph/val_accuracy`` over the val mask."""
    from ..core.trainer import _move

    was_training = model.training
    model.eval()
    metrics: dict = {}
    with torch.no_grad():
        for graph, y_test, y_val in eval_data:
            out = model(_move(graph, device))
            y_test, y_val = y_test.to(out.device), y_val.to(out.device)
            metrics["accuracy"] = _accuracy(out, y_test)
            metrics["loss"] = float(masked_cross_entropy(out, y_test))
            if (y_val != IGNORE).any():
                metrics["graph/val_accuracy"] = _accuracy(out, y_val)
    model.train(was_training)
    return metrics


def configure_sbm(params: SbmParams):
    """The sbm Task for `params`, named by the parameters that differ from the defaults."""
    from ..data.tasks import Task  # here: haet.data.tasks registers these tasks as it loads

    given = [f"{f.name}={getattr(params, f.name)}" for f in dataclasses.fields(params)
             if getattr(params, f.name) != f.default]
    name = "sbm" + (":" + ",".join(given) if given else "")
    return Task(name, _sbm_summary(params), lambda seed, data_dir=None: load_sbm(params, seed, data_dir),
                (params.features,), params.blocks, "egc-s", GRAPH_MODELS, "generated (torch_geometric SBM)",
                loss_fn=masked_cross_entropy, eval_fn=masked_eval, params=SbmParams, configure=configure_sbm)


def graph_tasks() -> list:
    from ..data.tasks import Task

    karate = Task("karate", "Zachary's karate club (torch_geometric): 34 nodes, 4 communities, 4 labelled "
                  "train / 30 test nodes, full-graph steps", load_karate, (34,), 4, "egc-s", GRAPH_MODELS,
                  "torch_geometric (bundled)", loss_fn=masked_cross_entropy, eval_fn=masked_eval)
    return [karate, configure_sbm(SbmParams())]


def _sbm_summary(p: SbmParams) -> str:
    return (f"stochastic block model, {p.nodes} nodes, degree ~{p.degree:g}, {p.blocks} communities, "
            f"{p.features} Gaussian features; {p.train:.0%}/{p.val:.0%}/{1 - p.train - p.val:.0%} seeded masks; "
            "set with sbm:nodes=..,degree=..")


def _masked(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(labels, IGNORE)
    out[keep] = labels[keep]
    return out


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    mask = y != IGNORE
    return float((out[mask].argmax(-1) == y[mask]).float().mean()) if mask.any() else float("nan")
