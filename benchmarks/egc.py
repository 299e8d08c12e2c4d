"""EGC against GCN, GAT, GATv2 and GIN: training memory and step time as graphs grow, fusion cost, accuracy.

    flock /tmp/haet-cpu.lock python benchmarks/egc.py [--repeats 7] [--seeds 3] [--epochs 100]
        [--parts memory,fusion,accuracy] [--quick]

Targets from the paper (Tailor et al., HAET 2021): EGC's memory is O(V), not O(E); fusing
several aggregators costs +19% latency over one plain sparse product. Every model is built by
`haet.graph.models.graph_model` at the parameter count of EGC-S (hidden 64) and fed the graph input
it is efficient with (CSR adjacency for EGC, GCN, GIN; edge_index for GAT, GATv2).

Part 1, memory and time on sbm graphs (32 features, 5 blocks), interleaved per size after a
warm-up: (a) nodes fixed at 2,000, degree 5 → 80 (edges grow); (b) degree fixed at 10, nodes
1,000 → 8,000. Per model: the bytes autograd saves for backward in one training step (haet's memory
meter, deterministic), the growth of the process's peak resident memory during one step (all
allocations with temporaries, after malloc_trim; noisy on a shared machine), the median step time
(forward, backward, Adam) over repeats, and the FLOPs haet's meter counts (sparse products by
nonzeros; gathers/scatters of edge_index layers are not counted). Plot: docs/egc_memory.png.
Part 2, aggregation alone (V=2,000, 64 channels): one sparse product (sum) against EGC-M's fused
sum+std+max as torch_geometric 2.8.1 runs it on a CSR adjacency (and, for reference, by message
passing over edge_index), forward + backward, median over repeats.
Part 3, accuracy on sbm (2,000 nodes, degree 10) for every model, seeds 0..N-1, Adam lr 0.01.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import haet
from haet.core.record import hardware_info
from haet.data import get_task
from haet.graph.models import KINDS, count_params, graph_model
from haet.graph.tasks import masked_cross_entropy

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
MODELS = tuple(KINDS)  # egc-s, egc-m, gcn, gat, gatv2, gin
MIB = 2**20


def header() -> None:
    hw = hardware_info(torch.device("cpu"))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, machine {platform.node()}, "
          f"cpu {hw['cpu']} ({os.cpu_count()} cores), {hw['threads']} torch threads, torch {hw['torch']}, git {rev}")
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)"
          + ("  -- the machine is loaded: times are under contention" if load[0] > (os.cpu_count() or 1) * 0.5 else ""))


def sbm(nodes: int, degree: float, seed: int = 0):
    (graph, y), = get_task(f"sbm:nodes={nodes},degree={degree}").load(seed, None)[0]
    return graph, y


def saved_and_flops(name: str, graph: dict, y: torch.Tensor) -> tuple[int, float]:
    """Saved-for-backward bytes and counted FLOPs of one step, read from a one-step haet run."""
    haet.seed_everything(0)
    model = graph_model(name, graph["x"].size(1), 5)
    record = haet.Trainer(model, [(graph, y)], None, loss_fn=masked_cross_entropy, progress=False).fit(1)
    return record.cost["memory_bytes"]["activations"], record.cost["flops"]


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _trim_and_reset() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so a step's peak needs fresh pages
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size


def make_step(name: str, graph: dict, y: torch.Tensor):
    haet.seed_everything(0)
    model = graph_model(name, graph["x"].size(1), 5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        masked_cross_entropy(model(graph), y).backward()
        opt.step()

    return step


def measure_size(graph: dict, y: torch.Tensor, repeats: int) -> dict[str, dict]:
    steps = {m: make_step(m, graph, y) for m in MODELS}
    out = {m: {"times": []} for m in MODELS}
    for m, step in steps.items():
        step(), step()  # warm-up: optimizer state, allocator, first-use costs
        _trim_and_reset()
        rss0 = _proc_kib("VmRSS")
        step()
        out[m]["rss_step_mib"] = (_proc_kib("VmHWM") - rss0) / 1024
        out[m]["saved_bytes"], out[m]["flops"] = saved_and_flops(m, graph, y)
    for _ in range(repeats):  # interleaved: every model sees the same contention
        for m, step in steps.items():
            t0 = time.perf_counter()
            step()
            out[m]["times"].append(time.perf_counter() - t0)
    for m in MODELS:
        out[m]["step_ms"] = 1e3 * statistics.median(out[m]["times"])
    return out


def sweep(label: str, sizes: list[tuple[int, float]], repeats: int) -> list[tuple[int, int, dict]]:
    rows = []
    print(f"\n== {label} ==")
    print(f"{'nodes':>6} {'edges':>7} {'model':>6} {'saved MiB':>10} {'step RSS MiB':>13} {'step ms':>9} "
          f"{'FLOPs/step':>11}")
    for nodes, degree in sizes:
        graph, y = sbm(nodes, degree)
        edges = int((graph["edge_index"][0] != graph["edge_index"][1]).sum())
        res = measure_size(graph, y, repeats)
        for m in MODELS:
            r = res[m]
            print(f"{nodes:>6} {edges:>7} {m:>6} {r['saved_bytes'] / MIB:>10.2f} {r['rss_step_mib']:>13.1f} "
                  f"{r['step_ms']:>9.1f} {r['flops']:>11.3g}", flush=True)
        rows.append((nodes, edges, res))
        del graph, y, res
    first, last = rows[0], rows[-1]
    growth = (last[1] / first[1]) if label.startswith("edges") else (last[0] / first[0])
    what = "edges" if label.startswith("edges") else "nodes"
    print(f"growth from the first to the last size ({what} ×{growth:.1f}): saved bytes / step RSS / step time")
    for m in MODELS:
        a, b = first[2][m], last[2][m]
        print(f"  {m:>6}: ×{b['saved_bytes'] / a['saved_bytes']:.2f} / "
              f"×{b['rss_step_mib'] / max(a['rss_step_mib'], 0.1):.2f} / ×{b['step_ms'] / a['step_ms']:.2f}")
    return rows


def plot(edge_rows, node_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for m in MODELS:
        e = [r[1] for r in edge_rows]
        axes[0].plot(e, [r[2][m]["saved_bytes"] / MIB for r in edge_rows], marker="o", label=m)
        axes[1].plot(e, [r[2][m]["rss_step_mib"] for r in edge_rows], marker="o", label=m)
        axes[2].plot([r[0] for r in node_rows], [r[2][m]["saved_bytes"] / MIB for r in node_rows], marker="o", label=m)
    axes[0].set(title="saved for backward, 2,000 nodes", xlabel="edges", ylabel="MiB (haet memory meter)")
    axes[1].set(title="peak RSS growth in one step, 2,000 nodes", xlabel="edges", ylabel="MiB (process)")
    axes[2].set(title="saved for backward, degree 10", xlabel="nodes", ylabel="MiB (haet memory meter)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training memory of EGC and baselines at matched parameters (sbm graphs, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def fusion(repeats: int) -> None:
    """One SpMM (sum) vs EGC-M's fused aggregators on the same CSR graph, forward + backward."""
    from torch_geometric.nn import EGConv

    graph, _ = sbm(2000, 20)
    x = torch.randn(2000, 64, requires_grad=True)
    layers = {"sum (one SpMM)": EGConv(64, 64, ["sum"], 4, 4, add_self_loops=False),
              "sum+std+max (fused)": EGConv(64, 64, ["sum", "std", "max"], 4, 4, add_self_loops=False)}
    runs = {"sum (one SpMM)": lambda: layers["sum (one SpMM)"].message_and_aggregate(graph["adj"], x),
            "sum+std+max (fused)": lambda: layers["sum+std+max (fused)"].message_and_aggregate(graph["adj"], x),
            # the same three aggregators by message passing over edge_index (gather, then scatter)
            "sum+std+max (scatter)": lambda: layers["sum+std+max (fused)"].propagate(
                graph["edge_index"], x=x, symnorm_weight=None)}
    times = {k: [] for k in runs}
    for _ in range(3 + repeats):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run().sum().backward()
            times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v[3:]) for k, v in times.items()}
    print("\n== aggregation alone: 2,000 nodes, ~40,000 edges, 64 channels, forward + backward ==")
    for k, v in med.items():
        print(f"  {k:>22}: {v:.2f} ms")
    ratio = med["sum+std+max (fused)"] / med["sum (one SpMM)"]
    print(f"  fused / plain: ×{ratio:.2f} (+{100 * (ratio - 1):.0f}%; paper: +19%)")


def accuracy(seeds: int, epochs: int) -> None:
    print(f"\n== accuracy on sbm (2,000 nodes, degree 10), {epochs} full-graph epochs, Adam lr 0.01, "
          f"seeds 0..{seeds - 1} ==")
    task = get_task("sbm")
    results = {m: [] for m in MODELS}
    times = {m: [] for m in MODELS}
    for seed in range(seeds):
        train, test = task.load(seed, None)
        for m in MODELS:
            haet.seed_everything(seed)
            model = graph_model(m, 32, 5)
            r = haet.Trainer(model, train, test, loss_fn=task.loss_fn, eval_fn=task.eval_fn, progress=False,
                             seed=seed, optimizer=torch.optim.Adam(model.parameters(), lr=0.01)).fit(epochs)
            results[m].append(r.metrics["accuracy"])
            times[m].append(r.cost["train_s"])
    print(f"{'model':>6} {'params':>7} {'hidden':>6} {'test accuracy (mean ± std)':>27} {'per seed':>24} {'train s':>8}")
    for m in MODELS:
        net = graph_model(m, 32, 5)
        acc = results[m]
        print(f"{m:>6} {count_params(net):>7} {net.hidden:>6} {statistics.mean(acc):>18.3f} ± "
              f"{statistics.stdev(acc) if len(acc) > 1 else 0:.3f} {' '.join(f'{a:.3f}' for a in acc):>24} "
              f"{statistics.median(times[m]):>8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="timed steps per model and size (median)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--plot", default="docs/egc_memory.png")
    p.add_argument("--parts", default="memory,fusion,accuracy", help="which parts to run (comma-separated)")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 seed: a smoke run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    header()
    if args.quick:
        edge_sizes, node_sizes, args.seeds, args.epochs = [(500, 5), (500, 20)], [(500, 10), (1000, 10)], 1, 20
    else:
        edge_sizes = [(2000, d) for d in (5, 10, 20, 40, 80)]
        node_sizes = [(n, 10) for n in (1000, 2000, 4000, 8000)]
    parts = set(args.parts.split(","))
    if "memory" in parts:
        edge_rows = sweep("edges grow, nodes fixed", edge_sizes, args.repeats)
        node_rows = sweep("nodes grow, degree fixed", node_sizes, args.repeats)
        plot(edge_rows, node_rows, Path(args.plot))
    if "fusion" in parts:
        fusion(args.repeats)
    if "accuracy" in parts:
        accuracy(args.seeds, args.epochs)
    print(f"\nload average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
