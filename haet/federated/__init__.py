"""Zero-shot federated learning with new classes (Gudur and Perepu, 2021), heterogeneous models.

Clients hold non-IID shards; some hold classes the server has never seen, known to them only
under private names. Under the zero-shot strategy those clients send data impressions
(inputs synthesized from their trained model, Nayak et al. 2019) instead of data; the server
clusters the impressions to tell new classes apart across clients, gives each a free output
slot, and trains the global model on them. FedAvg is the baseline. Clients may run different
widths of one model family (HeteroFL aggregation). Every client trains with the haet Trainer.

    from haet.federated import FedConfig, run_local, run_flower, to_record
    result = run_local(FedConfig(task="mnist5k", clients=6, rounds=10, new_classes=2))
    to_record(result).save("runs/fed")

`run_flower` runs the same algorithm as a Flower ServerApp/ClientApp simulation on Ray
(extra ``haet[federated]``).
"""

from .client import ClientUpdate, client_round
from .clustering import assign_groups, cluster_points
from .config import FedConfig
from .impressions import class_similarity, synthesize
from .run import FedResult, run_local, to_record
from .server import Server
from .shards import ClientShard, Split, make_split


def run_flower(config: FedConfig, **kwargs) -> FedResult:
    """`haet.federated.flower.run_flower` (imports Flower and Ray only when called)."""
    from .flower import run_flower as _run

    return _run(config, **kwargs)


__all__ = ["FedConfig", "FedResult", "run_local", "run_flower", "to_record", "Server", "ClientUpdate",
           "client_round", "make_split", "Split", "ClientShard", "synthesize", "class_similarity",
           "cluster_points", "assign_groups"]
