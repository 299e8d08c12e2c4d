"""One federated run, in process (`run_local`), and its RunRecord.

The rounds go: the server plans (weights slice and slots per client), each client runs
`client_round` on its own shard, the server receives the updates and is scored on the test set.
The Flower adapter (`haet.federated.flower`) runs the very same `Server` and `client_round`
as a ServerApp and ClientApps; only the transport differs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import __version__
from ..core.record import RunRecord, hardware_info
from .client import ClientUpdate, client_round
from .config import FedConfig
from .server import Server
from .shards import Split, make_split


@dataclass
class FedResult:
    config: FedConfig
    rounds: list[dict] = field(default_factory=list)        # per round: accuracies, bytes up/down
    clients: dict[int, dict] = field(default_factory=dict)  # per client: time, energy, widths
    server: dict = field(default_factory=dict)
    wall_s: float = 0.0
    backend: str = "local"
    global_state: dict = field(default_factory=dict)        # the final global model's weights

    @property
    def final(self) -> dict:
        return self.rounds[-1] if self.rounds else {}


def split_for(config: FedConfig) -> Split:
    return make_split(config.task, config.clients, config.new_classes, config.seed, iid=config.iid,
                      alpha=config.alpha, holders=config.holders)


def new_server(config: FedConfig, split: Split) -> Server:
    return Server(config, split.input_shape, split.num_classes, split.seen, [s.num_new for s in split.shards])


def oracle_slots(split: Split, client: int) -> list[int]:
    """FedAvg's oracle: a private new class's output slot is its true class index."""
    return list(split.shards[client].new_truth)


def run_local(config: FedConfig, *, on_round: Callable[[dict], None] | None = None,
              inspect: Callable[[ClientUpdate], None] | None = None) -> FedResult:
    """The whole run in this process. `inspect` sees every update the server receives.

    Clients run one after another on one thread each, as the Flower nodes do (one CPU per node):
    tiny models gain nothing from more threads, and both backends then compute the same numbers.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_local(config, on_round, inspect)
    finally:
        torch.set_num_threads(threads)


def _run_local(config, on_round, inspect) -> FedResult:
    start = time.perf_counter()
    split = split_for(config)
    server = new_server(config, split)
    result = FedResult(config)
    for r in range(1, config.rounds + 1):
        updates, down = [], 0
        for k, shard in enumerate(split.shards):
            weights, slots = server.plan(k, oracle_slots(split, k))
            down += payload_bytes(weights, slots)
            update = client_round(shard, k, config, weights, slots, r, split.input_shape, split.num_classes)
            if inspect is not None:
                inspect(update)
            updates.append(update)
        finish_round(server, split, updates, r, down, result, on_round)
    result.wall_s = time.perf_counter() - start
    return result


def finish_round(server: Server, split: Split, updates: list[ClientUpdate], r: int, down: int, result: FedResult,
                 on_round: Callable[[dict], None] | None) -> None:
    """Aggregate, score and book one round (shared by both backends)."""
    server.receive(updates, r)
    line = {"round": r, **server.accuracy(split.test, split.seen, server.slots_for_truth(split)),
            "bytes_up": sum(u.bytes_up() for u in updates), "bytes_down": down,
            "impressions": sum(len(u.impressions) for u in updates)}
    result.rounds.append(line)
    for u in updates:
        c = result.clients.setdefault(u.client, {"width": server.config.width_of(u.client), "train_s": 0.0,
                                                 "energy_j": 0.0, "impression_s": 0.0, "impression_energy_j": 0.0,
                                                 "samples": u.num_samples})
        for key in ("train_s", "energy_j", "impression_s", "impression_energy_j"):
            c[key] += float(u.stats.get(key, 0.0))
        c["energy_source"] = u.stats.get("energy_source")
    result.server = {"train_s": server.server_stats["train_s"], "energy_j": server.server_stats["energy_j"],
                     "energy_source": server.server_energy_source,
                     "new_class_slots": {str(c): s for c, s in server.slots_for_truth(split).items()}}
    result.global_state = {k: v.detach().clone() for k, v in server.model.state_dict().items()}
    if on_round is not None:
        on_round(line)


def payload_bytes(weights: dict[str, torch.Tensor], slots: list[int]) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values()) + 8 * len(slots)


def to_record(result: FedResult) -> RunRecord:
    """The run as a RunRecord: metrics.accuracy is the final global test accuracy."""
    cfg, final = result.config, result.final
    mm: dict = {f"federated/{k}": final.get(k) for k in ("accuracy_seen", "accuracy_new")}
    mm.update({"federated/bytes_up": [r["bytes_up"] for r in result.rounds],
               "federated/bytes_down": [r["bytes_down"] for r in result.rounds],
               "federated/rounds": len(result.rounds), "federated/clients": cfg.clients,
               "federated/strategy": cfg.strategy, "federated/backend": result.backend,
               "federated/heterogeneous": cfg.heterogeneous, "federated/new_classes": cfg.new_classes,
               "federated/new_class_slots": result.server.get("new_class_slots", {})})
    for k, c in sorted(result.clients.items()):
        for key, value in c.items():
            mm[f"federated/client{k}/{key}"] = value
    mm["federated/server/train_s"] = result.server.get("train_s", 0.0)
    mm["federated/server/energy_j"] = result.server.get("energy_j", 0.0)
    train_s = sum(c["train_s"] + c["impression_s"] for c in result.clients.values())
    energy = sum(c["energy_j"] + c["impression_energy_j"] for c in result.clients.values()) \
        + result.server.get("energy_j", 0.0)
    sources = {c.get("energy_source") for c in result.clients.values()} | {"model"}
    history = [{"epoch": r["round"], **{k: v for k, v in r.items() if k != "round"}} for r in result.rounds]
    return RunRecord(task=cfg.task, model=f"{'hetero-' if cfg.heterogeneous else ''}federated",
                     methods=[{"name": f"federated-{cfg.strategy}", "params": cfg.to_dict()}],
                     label=f"federated:{cfg.strategy}" + (":hetero" if cfg.heterogeneous else ""), seed=cfg.seed,
                     device=cfg.device, hardware=hardware_info(torch.device("cpu")), epochs=len(result.rounds),
                     steps=len(result.rounds), stopped_by="epochs",
                     metrics={"accuracy": final.get("accuracy")}, history=history,
                     cost={"wall_s": result.wall_s, "train_s": train_s, "energy_j": energy,
                           "energy_source": "+".join(sorted(s for s in sources if s))},
                     method_metrics=mm, haet_version=__version__)
