"""The federated run's settings: one frozen, validated dataclass shared by every backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..core.config import check_choice, check_range
from ..core.errors import choices_error

STRATEGIES = ("zeroshot", "fedavg")
BACKENDS = ("local", "flower")
FED_TASKS = ("mnist5k", "digits", "mnist1d")  # classification tasks with a width family (haet.federated.models)
#: Widths given to clients in turn with --heterogeneous (client k gets HETERO_WIDTHS[k % 3]).
HETERO_WIDTHS = (1.0, 0.5, 0.25)


@dataclass(frozen=True)
class FedConfig:
    task: str = "mnist5k"
    clients: int = 6
    rounds: int = 10
    new_classes: int = 2          # classes held by only `holders` clients each, unknown to the server
    strategy: str = "zeroshot"    # zeroshot (impressions + clustering) or fedavg
    heterogeneous: bool = False   # clients at widths 1, 1/2, 1/4 of one family (HeteroFL aggregation)
    seed: int = 0
    iid: bool = False             # True: every class split evenly over clients
    alpha: float = 0.5            # Dirichlet concentration of the seen-class split (smaller = more skewed)
    holders: int = 2              # clients that hold each new class
    local_epochs: int = 1         # local epochs per round, per client
    batch_size: int = 32
    lr: float = 1e-3              # Adam, fresh each round on each client
    impressions_per_class: int = 12   # impressions a holder of a new class sends per class it knows
    impression_steps: int = 30        # input-optimization steps per batch of impressions
    server_epochs: int = 2            # epochs of the global model on the pooled impressions per round
    server_train: str = "all"         # what learns from impressions: every layer ("all") or the final one ("head")
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.task not in FED_TASKS:
            raise choices_error("task", self.task, FED_TASKS)
        check_range("clients", self.clients, 2, 64, integer=True)
        check_range("rounds", self.rounds, 1, 1000, integer=True)
        check_range("new_classes", self.new_classes, 0, 5, integer=True)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_range("seed", self.seed, 0, 2**31 - 1, integer=True)
        check_range("alpha", self.alpha, 0, None, lo_open=True)
        check_range("holders", self.holders, 1, self.clients, integer=True)
        check_range("local_epochs", self.local_epochs, 1, 100, integer=True)
        check_range("batch_size", self.batch_size, 1, 4096, integer=True)
        check_range("lr", self.lr, 0, 1, lo_open=True)
        check_range("impressions_per_class", self.impressions_per_class, 1, 1000, integer=True)
        check_range("impression_steps", self.impression_steps, 0, 10_000, integer=True)
        check_range("server_epochs", self.server_epochs, 0, 100, integer=True)
        check_choice("server_train", self.server_train, ("head", "all"))
        check_choice("device", self.device, ("cpu", "cuda", "auto"))

    def width_of(self, client: int) -> float:
        return HETERO_WIDTHS[client % len(HETERO_WIDTHS)] if self.heterogeneous else 1.0

    def to_dict(self) -> dict:
        return asdict(self)
