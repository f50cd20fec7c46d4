"""The process layout of a distributed job (capture, training): torchrun's environment, the process group
and, for training, the device mesh.

Ranks form a (data, model) DeviceMesh: ``model_parallel`` consecutive ranks share one data-parallel
batch and split the latents between them; the groups of them are data parallel. Without torchrun
(no WORLD_SIZE) the job is one process and no process group is created.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .devices import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    model_parallel: int = 1
    owned: bool = False
    """This process created the process group (and destroys it at the end)."""
    mesh: Any = None
    """DeviceMesh ("data", "model") when world > 1, else None."""

    @property
    def data_parallel(self) -> int:
        return self.world // self.model_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.model_parallel

    @property
    def mp_rank(self) -> int:
        return self.rank % self.model_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def dp_group(self) -> Any:
        return self.mesh.get_group("data") if self.mesh is not None else None

    @property
    def mp_group(self) -> Any:
        return self.mesh.get_group("model") if self.mesh is not None else None

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum_(self, t: torch.Tensor, group: Any = None) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def close(self, *, barrier: bool = True) -> None:
        """Destroy the process group if this process created it. ``barrier``: wait for every rank first (after
        success); leave it out after a failure, when the other ranks may never arrive."""
        if self.owned and dist.is_initialized():
            # Every rank reaches this point before any tears its connections down; a rank that exits
            # while a peer is still using the gloo pairs can make that peer abort.
            if barrier:
                self.barrier()
            # Drop the mesh (and with it the last Python references to its groups) and collect what the
            # trainer left, so no gloo work object outlives the process group into interpreter shutdown.
            self.mesh = None
            gc.collect()
            dist.destroy_process_group()
            self.owned = False


def setup_distributed(device: str, model_parallel: int = 1, timeout_min: float = 30.0, *,
                      mesh: bool = True) -> DistContext:
    """Read torchrun's environment, start the process group (NCCL on GPUs, gloo on CPU) and (``mesh``) the
    (data, model) device mesh. A process group that already exists is used, not owned."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % model_parallel:
        raise ValueError(f"--model-parallel {model_parallel} must divide the number of processes ({world}); "
                         f"launch e.g. torchrun --nproc-per-node {model_parallel * max(1, world // model_parallel)}")
    if world == 1:
        return DistContext(device=dev, model_parallel=model_parallel)
    owned = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=dev if dev.type == "cuda" else None)
        owned = True
    grid = None
    if mesh:
        from torch.distributed.device_mesh import init_device_mesh

        grid = init_device_mesh(dev.type, (world // model_parallel, model_parallel), mesh_dim_names=("data", "model"))
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev,
                       model_parallel=model_parallel, owned=owned, mesh=grid)
