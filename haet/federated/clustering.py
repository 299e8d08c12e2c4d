"""Telling new classes apart across clients without labels.

Clients report new classes under private names, so "client A's new class 0" and "client B's new
class 0" may or may not be the same thing. The server embeds every impression it received with
the global model's penultimate features, projects them to two dimensions with PCA and clusters
them with k-means (Gudur and Perepu 2021 use PCA(2) + k-medoids; k-means is the scikit-learn
equivalent on a 2-D projection). Each reported (client, private name) group goes to the cluster
that holds most of its impressions; each cluster gets one free output slot of the global model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def embed(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features of a Sequential model (everything but its final Linear)."""
    model.eval()
    with torch.no_grad():
        return model[:-1](x).flatten(1)


def cluster_points(points: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means on a PCA(2) projection of standardized `points`: a cluster index per point."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    if k <= 1 or len(points) <= k:
        return np.zeros(len(points), dtype=int) if k <= 1 else np.arange(len(points)) % k
    z = (points - points.mean(axis=0)) / (points.std(axis=0) + 1e-8)
    low = PCA(n_components=min(2, z.shape[1]), random_state=seed).fit_transform(z)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(low)


def assign_groups(cluster_of_point: np.ndarray, group_of_point: list, k: int) -> dict:
    """Each group (e.g. (client, private name)) -> its majority cluster in [0, k)."""
    out = {}
    for g in dict.fromkeys(group_of_point):
        members = cluster_of_point[[i for i, h in enumerate(group_of_point) if h == g]]
        out[g] = int(np.bincount(members, minlength=k).argmax())
    return out


def match_truth(group_cluster: dict, group_truth: dict, new_classes: tuple[int, ...], k: int) -> dict[int, int]:
    """Score the clustering: the one-to-one map true new class -> cluster that agrees with most groups.

    Hungarian matching on the (class, cluster) group counts; a class left without a cluster maps
    to -1 (its test samples then count as wrong).
    """
    from scipy.optimize import linear_sum_assignment

    counts = np.zeros((len(new_classes), max(k, 1)))
    for g, cl in group_cluster.items():
        counts[new_classes.index(group_truth[g]), cl] += 1
    rows, cols = linear_sum_assignment(-counts)
    out = {c: -1 for c in new_classes}
    for r, c in zip(rows, cols):
        out[new_classes[r]] = int(c)
    return out
