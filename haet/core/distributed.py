"""Data parallel training on torch.distributed (launch with ``torchrun --nproc_per_node=N -m haet ...``).

The Trainer reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group
(gloo on CPU, nccl on CUDA), wraps the model in DistributedDataParallel, gives each rank an equal
shard of every epoch, agrees on stopping across ranks, aggregates the meters and lets rank 0 write.
"""

from __future__ import annotations

import atexit
import gc
import os

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not launched so."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group if torchrun started us; returns (rank, world_size)."""
    rank, world, _ = env_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # The group haet opened is closed at exit: left open, gloo's threads abort the process
        # during interpreter shutdown ("terminate called without an active exception").
        atexit.register(shutdown)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown() -> None:
    """Leave the process group (if one is open)."""
    if dist.is_initialized():
        gc.collect()  # finish off DDP reducers and pending work objects while the group still exists
        dist.barrier()  # no rank tears its end down while another still talks to it
        dist.destroy_process_group()


def agree_stop(reason: str | None, device: torch.device) -> str | None:
    """Every rank's view of whether to stop: the first rank's reason when any rank has one."""
    t = torch.tensor([0.0 if reason is None else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t.item() == 0:
        return None
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next(r for r in reasons if r is not None)


SUMMED = ("flops", "energy_j", "energy_model_j", "bytes_moved")
MAXED = ("wall_s", "train_s", "eval_s", "peak_mem_mb")


def aggregate_cost(cost: dict, device: torch.device) -> dict:
    """Sum work and energy over ranks; take the slowest rank's times and the largest peak memory."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return cost
    out = dict(cost)
    for keys, op in ((SUMMED, dist.ReduceOp.SUM), (MAXED, dist.ReduceOp.MAX)):
        present = [k for k in keys if isinstance(cost.get(k), (int, float))]
        t = torch.tensor([float(cost[k]) for k in present], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        out.update(zip(present, t.tolist()))
    phases = cost.get("phases_s", {})
    if phases:
        names = sorted(phases)
        t = torch.tensor([phases[k] for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out["phases_s"] = dict(zip(names, t.tolist()))
    if isinstance(out.get("mfu"), float) and isinstance(cost.get("flops"), (int, float)) and cost["flops"]:
        out["mfu"] = cost["mfu"] * out["flops"] / cost["flops"] / dist.get_world_size()
    out["world_size"] = dist.get_world_size()
    return out
