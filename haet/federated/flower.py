"""The same federated algorithm as real Flower apps (Message API, simulated on Ray).

`run_flower` builds a ``ServerApp`` whose main loop drives `Server` (plan, receive, score) and a
``ClientApp`` whose handlers run `client_round` on the node's own shard, then simulates them with
``flwr.simulation.run_simulation`` on the Ray backend. Nothing but Flower records crosses the
boundary: down, an ``ArrayRecord`` of the weight slice and a ``ConfigRecord`` of the round and
slots; up, ``ArrayRecord``s of weights and impressions and a ``ConfigRecord`` of statistics.
A node learns which shard is its own from ``context.node_config["partition-id"]`` and builds it
from the run's settings, so no data is shipped to it.

Ray's session files and Flower's home go into ``workdir`` (a temporary folder by default), and
Flower's and Ray's logging is quiet unless ``verbose=True``.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .client import ClientUpdate, client_round
from .config import FedConfig
from .run import FedResult, finish_round, new_server, oracle_slots, payload_bytes, split_for
from .shards import Split

#: Seconds the server waits for the simulated nodes to register.
NODE_WAIT_S = 120.0
#: Longest Ray temp folder path that leaves room for Ray's session and socket names (Unix limit 107).
RAY_DIR_MAX_CHARS = 30


def run_flower(config: FedConfig, *, workdir: str | os.PathLike | None = None, verbose: bool = False,
               on_round: Callable[[dict], None] | None = None,
               inspect: Callable[[ClientUpdate], None] | None = None) -> FedResult:
    """Run `config` as a Flower simulation of `config.clients` nodes; returns what `run_local` returns."""
    own_tmp = workdir is None
    base = Path(tempfile.mkdtemp(prefix="haet-fl-")) if own_tmp else Path(workdir)
    base.mkdir(parents=True, exist_ok=True)
    # Ray's Unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under 107
    # characters: a deep `workdir` gets its Ray session in a short temporary folder, removed after.
    ray_dir = base / "ray"
    short = len(str(ray_dir.resolve())) > RAY_DIR_MAX_CHARS
    if short:
        ray_dir = Path(tempfile.mkdtemp(prefix="haet-ray-"))
    saved_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(base / "flwr")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU nodes: keep Ray's future default, quietly
    try:
        return _simulate(config, ray_dir, verbose, on_round, inspect)
    finally:
        if saved_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = saved_home
        if own_tmp:
            shutil.rmtree(base, ignore_errors=True)
        if short:
            shutil.rmtree(ray_dir, ignore_errors=True)


def _simulate(config, ray_dir, verbose, on_round, inspect) -> FedResult:
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if not verbose:
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)
    start = time.perf_counter()
    split = split_for(config)
    result = FedResult(config, backend="flower")
    failure: list[BaseException] = []
    settings = config.to_dict()

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        try:
            nodes = _wait_for_nodes(grid, config.clients)
            replies = grid.send_and_receive([Message(RecordDict({"run": ConfigRecord(settings)}), dst_node_id=n,
                                                     message_type="query") for n in nodes])
            node_of, new_counts = {}, {}
            for reply in replies:
                info = reply.content["shard"]
                node_of[int(info["partition"])] = reply.metadata.src_node_id
                new_counts[int(info["partition"])] = int(info["new_count"])
            server = new_server(config, split)
            server.new_counts = [new_counts[k] for k in range(config.clients)]
            for r in range(1, config.rounds + 1):
                messages, down = [], 0
                for k in range(config.clients):
                    weights, slots = server.plan(k, oracle_slots(split, k))
                    down += payload_bytes(weights, slots)
                    content = RecordDict({"weights": ArrayRecord.from_torch_state_dict(weights),
                                          "plan": ConfigRecord({"round": r, "client": k, "slots": slots}),
                                          "run": ConfigRecord(settings)})
                    messages.append(Message(content, dst_node_id=node_of[k], message_type="train"))
                updates = sorted((_update_from(m.content) for m in grid.send_and_receive(messages)),
                                 key=lambda u: u.client)
                if len(updates) != config.clients:
                    raise RuntimeError(f"round {r}: {len(updates)} of {config.clients} clients replied")
                for u in updates:
                    if inspect is not None:
                        inspect(u)
                finish_round(server, split, updates, r, down, result, on_round)
        except BaseException as err:  # surfaced in the caller's thread below
            failure.append(err)

    client_app = ClientApp()

    @client_app.query()
    def report(msg, context):
        cfg = FedConfig(**dict(msg.content["run"]))
        k = int(context.node_config["partition-id"])
        shard = _cached_split(cfg).shards[k]
        return Message(RecordDict({"shard": ConfigRecord({"partition": k, "new_count": shard.num_new})}),
                       reply_to=msg)

    @client_app.train()
    def train(msg, context):
        cfg = FedConfig(**dict(msg.content["run"]))
        k = int(context.node_config["partition-id"])
        plan = msg.content["plan"]
        sp = _cached_split(cfg)
        weights = msg.content["weights"].to_torch_state_dict()
        u = client_round(sp.shards[k], k, cfg, weights, [int(s) for s in plan.get("slots", [])], int(plan["round"]),
                         sp.input_shape, sp.num_classes)
        return Message(_content_of(u), reply_to=msg)

    backend = {"init_args": {"num_cpus": min(2, os.cpu_count() or 1), "include_dashboard": False,
                             "_temp_dir": str(ray_dir), "logging_level": logging.ERROR, "log_to_driver": verbose},
               "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.clients,
                   backend_name="ray", backend_config=backend, verbose_logging=verbose)
    _shutdown_ray()
    if failure:
        raise failure[0]
    if len(result.rounds) != config.rounds:
        raise RuntimeError(f"the Flower simulation finished {len(result.rounds)} of {config.rounds} rounds")
    result.wall_s = time.perf_counter() - start
    return result


@functools.lru_cache(maxsize=2)
def _cached_split(config: FedConfig) -> Split:
    return split_for(config)  # the node rebuilds its own shard from the settings; no data travels


def _wait_for_nodes(grid, n: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if len(nodes) < n:
        raise RuntimeError(f"only {len(nodes)} of {n} Flower nodes registered within {NODE_WAIT_S:.0f} s")
    return nodes[:n]


def _content_of(u: ClientUpdate):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    stats = {k: v for k, v in u.stats.items()}
    stats.update({"client": u.client, "num_samples": u.num_samples})
    return RecordDict({"weights": ArrayRecord.from_torch_state_dict(u.weights),
                       "impressions": ArrayRecord.from_torch_state_dict({"x": u.impressions,
                                                                          "slots": u.impression_slots,
                                                                          "names": u.impression_names,
                                                                          "targets": u.impression_targets}),
                       "stats": ConfigRecord(stats)})


def _update_from(content) -> ClientUpdate:
    """A reply's records as a ClientUpdate; refuses records other than weights, impressions, stats."""
    extra = set(content.keys()) - {"weights", "impressions", "stats"}
    if extra:
        raise ValueError(f"a client replied with records a client may not send: {sorted(extra)}")
    stats = dict(content["stats"])
    client, samples = int(stats.pop("client")), int(stats.pop("num_samples"))
    imp = content["impressions"].to_torch_state_dict()
    weights = {k: v.clone() for k, v in content["weights"].to_torch_state_dict().items()}
    return ClientUpdate(client, weights, samples, imp["x"].clone(), imp["slots"].long(), imp["names"].long(),
                        imp["targets"].clone(), stats)


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
