"""The server: plans each round, aggregates what clients send, learns new classes from impressions.

Per round: every client gets the slice of the global model at its width and the output slot of
each private new class (`plan`). From the updates (`receive`):

1. Zero-shot, first round with new classes reported: the impressions of private new classes are
   clustered (`clustering`); each cluster takes one free output slot (a class no client knows by
   name). A client trained its new class j in a provisional slot; its final-layer rows are
   permuted to the assigned slots before averaging. FedAvg is instead given every new class's
   true identity (an oracle the zero-shot strategy does without), so it is the stronger baseline.
2. HeteroFL average of the weights (`models.heterofl_average`; FedAvg when widths are equal).
3. Zero-shot: the global model is distilled for `server_epochs` on the pooled impressions, with the
   senders' probabilities as soft targets (zero-shot KD), through the haet Trainer: knowledge
   transfer from every width, the narrow clients included.

Without reported new classes the zero-shot strategy sends and does exactly what FedAvg does.
"""

from __future__ import annotations

import torch

from ..core.trainer import Trainer
from ..data.loader import TensorData
from . import clustering, models
from .client import UPDATE_FIELDS, ClientUpdate
from .config import FedConfig
from .shards import Split


class Server:
    def __init__(self, config: FedConfig, input_shape: tuple[int, ...], num_classes: int, seen: tuple[int, ...],
                 new_counts: list[int]) -> None:
        """`seen`: classes every client knows by index; new_counts[k]: private new classes client k reported."""
        self.config, self.input_shape, self.num_classes = config, input_shape, num_classes
        with torch.random.fork_rng():  # the initial global weights depend on the seed only
            torch.manual_seed(config.seed)
            self.model = models.build(input_shape, num_classes)
        self.spatial = models.flatten_spatial(self.model, input_shape)
        self.free_slots = [c for c in range(num_classes) if c not in seen]
        self.new_counts = list(new_counts)
        self.slot_of: dict[tuple[int, int], int] = {}  # (client, private name) -> output slot
        self.group_cluster: dict[tuple[int, int], int] = {}
        self.server_stats: dict[str, float] = {"train_s": 0.0, "energy_j": 0.0}
        self.server_energy_source = "model"

    # -- what goes down -----------------------------------------------------------------------
    def plan(self, client: int, oracle_slots: list[int] | None = None) -> tuple[dict[str, torch.Tensor], list[int]]:
        """(weights slice, slot per private new class) for `client`. FedAvg passes the oracle slots."""
        shapes = {k: v.shape for k, v in models.build(self.input_shape, self.num_classes,
                                                        self.config.width_of(client)).state_dict().items()}
        weights = models.slice_state(self.model.state_dict(), shapes, self.spatial)
        if self.config.strategy == "fedavg":
            slots = list(oracle_slots or [])
        else:
            slots = [self.slot_of.get((client, j), self.free_slots[j]) for j in range(self.new_counts[client])]
        return weights, slots

    # -- what comes up ------------------------------------------------------------------------
    def receive(self, updates: list[ClientUpdate], round_index: int) -> None:
        for u in updates:
            _check_update(u)
        if self.config.strategy == "zeroshot" and not self.slot_of and any(self.new_counts):
            self._assign_new_classes(updates)
            updates = [self._permute_head(u) for u in updates]
        averaged = models.heterofl_average(self.model.state_dict(), [(u.weights, float(u.num_samples))
                                                                      for u in updates], self.spatial)
        self.model.load_state_dict(averaged)
        if self.config.strategy == "zeroshot" and self.config.server_epochs > 0:
            self._learn_from_impressions(updates, round_index)

    def accuracy(self, test: TensorData, seen: tuple[int, ...], slot_of_class: dict[int, int]) -> dict[str, float]:
        """Global test accuracy with each true class c scored against output slot_of_class[c]."""
        target = torch.tensor([slot_of_class.get(int(c), int(c)) for c in test.y])
        pred = torch.cat([self.model.eval()(test.x[i:i + 512]).argmax(1) for i in range(0, len(test.x), 512)])
        correct = pred == target
        is_seen = torch.isin(test.y, torch.tensor(seen, dtype=torch.long))
        out = {"accuracy": float(correct.float().mean())}
        out["accuracy_seen"] = float(correct[is_seen].float().mean()) if is_seen.any() else float("nan")
        out["accuracy_new"] = float(correct[~is_seen].float().mean()) if (~is_seen).any() else float("nan")
        return out

    def slots_for_truth(self, split: Split) -> dict[int, int]:
        """Score-only: true new class -> the slot the server gave it (Hungarian match of clusters)."""
        if self.config.strategy == "fedavg" or not split.new:
            return {c: c for c in split.new}
        truth = {(k, j): c for k, s in enumerate(split.shards) for j, c in enumerate(s.new_truth)}
        k = len(self.free_slots)
        cluster_of = clustering.match_truth(self.group_cluster, truth, split.new, k)
        return {c: (self.free_slots[cl] if cl >= 0 else -1) for c, cl in cluster_of.items()}

    # -- private ------------------------------------------------------------------------------
    def _assign_new_classes(self, updates: list[ClientUpdate]) -> None:
        xs, groups = [], []
        for u in updates:
            mine = u.impression_names >= 0
            xs.append(u.impressions[mine])
            groups += [(u.client, int(j)) for j in u.impression_names[mine]]
        if not groups:
            return
        feats = clustering.embed(_average_model(self, updates), torch.cat(xs)).numpy()
        k = min(len(self.free_slots), len(dict.fromkeys(groups)))
        cluster = clustering.cluster_points(feats, k, seed=self.config.seed)
        self.group_cluster = clustering.assign_groups(cluster, groups, k)
        self.slot_of = {g: self.free_slots[c] for g, c in self.group_cluster.items()}

    def _permute_head(self, u: ClientUpdate) -> ClientUpdate:
        """Move the rows of the client's provisional new-class slots to the slots assigned to them."""
        perm = list(range(self.num_classes))  # perm[new row] = old row
        moves = {self.slot_of[(u.client, j)]: self.free_slots[j] for j in range(self.new_counts[u.client])
                 if (u.client, j) in self.slot_of}
        rest_new = [s for s in self.free_slots if s not in moves]
        rest_old = [s for s in self.free_slots if s not in moves.values()]
        for new_row, old_row in list(moves.items()) + list(zip(rest_new, rest_old)):
            perm[new_row] = old_row
        head = [k for k in u.weights if k.endswith(".weight")][-1].rsplit(".", 1)[0]
        weights = dict(u.weights)
        for key in (f"{head}.weight", f"{head}.bias"):
            weights[key] = u.weights[key][perm]
        slots = torch.tensor([perm.index(int(s)) for s in u.impression_slots], dtype=torch.long)
        targets = u.impression_targets[:, perm] if len(u.impression_targets) else u.impression_targets
        return ClientUpdate(u.client, weights, u.num_samples, u.impressions, slots, u.impression_names, targets,
                            u.stats)

    def _learn_from_impressions(self, updates: list[ClientUpdate], round_index: int) -> None:
        x = torch.cat([u.impressions for u in updates])
        if len(x) == 0:
            return
        y = torch.cat([u.impression_targets for u in updates])  # soft targets: cross-entropy distils them
        trainer = Trainer(self.model, TensorData(x, y), None, device=self.config.device, progress=False,
                          seed=self.config.seed * 7919 + round_index, batch_size=self.config.batch_size,
                          optimizer=torch.optim.Adam(_trained_params(self.model, self.config.server_train),
                                                     lr=self.config.lr), task=self.config.task,
                          model_name=models.family_name(self.input_shape), label="server-impressions")
        record = trainer.fit(self.config.server_epochs)
        self.model = self.model.cpu()
        self.server_stats["train_s"] += float(record.cost.get("train_s", 0.0))
        self.server_stats["energy_j"] += float(record.cost.get("energy_j") or 0.0)
        self.server_energy_source = str(record.cost.get("energy_source"))


def _average_model(server: Server, updates: list[ClientUpdate]) -> torch.nn.Sequential:
    """This round's plain average (before any head permutation): its trunk embeds the impressions."""
    model = models.build(server.input_shape, server.num_classes)
    model.load_state_dict(models.heterofl_average(server.model.state_dict(),
                                                  [(u.weights, float(u.num_samples)) for u in updates],
                                                  server.spatial))
    return model


def _trained_params(model: torch.nn.Sequential, which: str) -> list:
    # "head": only the final layer learns from impressions; the trunk keeps what real data taught it.
    return list(model[-1].parameters()) if which == "head" else list(model.parameters())


def _check_update(u: ClientUpdate) -> None:
    """Refuse an update that carries anything but weights, impressions and numeric statistics."""
    extra = set(vars(u)) - set(UPDATE_FIELDS)
    if extra:
        raise ValueError(f"client {u.client} sent fields a client may not send: {sorted(extra)}")
    if not all(isinstance(v, (int, float, str)) for v in u.stats.values()):
        raise ValueError(f"client {u.client} sent non-scalar statistics")
    if not len(u.impressions) == len(u.impression_slots) == len(u.impression_names) == len(u.impression_targets):
        raise ValueError(f"client {u.client} sent impressions without one slot and one name each")
