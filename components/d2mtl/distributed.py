"""Data-parallel training under ``torchrun``: the process group, this process's place in it, and the
few collectives the trainer needs.

``torchrun --nproc-per-node N -m d2mtl.cli teacher ...`` starts N processes and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each; ``launched`` reads them, starts the process group
(nccl on CUDA, gloo on CPU) and pins the process to its GPU. Without them (or with WORLD_SIZE=1) it
yields ``Distributed()``, a world of one, whose collectives return their input: single-process runs
take exactly the code path they always took.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from d2mtl.devices import resolve_device
from d2mtl.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    """This process's rank among ``world_size`` training processes (one per GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this process on its node

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and the model folder, and logs."""
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """``requested`` (auto, cpu, cuda) resolved; under DDP on CUDA, this process's own GPU."""
        device = resolve_device(requested)
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def seed(self, seed: int) -> int:
        """A seed of this rank's own (dropout masks must differ between ranks), derived from ``seed``."""
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def split(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of ``items`` (shares differ in length by at most one)."""
        return np.array_split(items, self.world_size)[self.rank] if self.enabled else items

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``values`` over the ranks (every rank gets the same result)."""
        if not self.enabled:
            return values
        summed = values.detach().clone()
        dist.all_reduce(summed)
        return summed

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Per key, the sum over the ranks of plain numbers (keys missing on a rank count as 0)."""
        if not self.enabled:
            return values
        total: dict[str, float] = {}
        for part in self.gather(values):
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
        return total

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of parameters outside the DDP module (the uncertainty weights)."""
        if not self.enabled:
            return
        for param in params:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.world_size

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every rank, so every rank evaluates one model."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)


def from_env() -> Distributed:
    """The torchrun variables of this process (a world of one when they are absent)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if not 0 <= rank < world_size:
        raise UserError(f"RANK {rank} is outside WORLD_SIZE {world_size}")
    return Distributed(rank, world_size, local_rank)


@contextmanager
def launched(device: str = "auto") -> Iterator[Distributed]:
    """The process group of a torchrun launch for the duration of a stage (none for a world of one).

    A group that is already up (started by the caller) is used as it is and left up.
    """
    place = from_env()
    if not place.enabled:
        yield place
        return
    started = not dist.is_initialized()
    if started:
        target = place.device(device)
        if target.type == "cuda":
            torch.cuda.set_device(target)
            dist.init_process_group("nccl", device_id=target)
        else:
            dist.init_process_group("gloo")
    package_log = logging.getLogger("d2mtl")
    level = package_log.level
    if not place.is_main:
        package_log.setLevel(logging.WARNING)  # one log of the run, from rank 0
    log.info(
        "rank %d of %d (local rank %d), backend %s", place.rank, place.world_size, place.local_rank, dist.get_backend()
    )
    try:
        yield place
    finally:
        package_log.setLevel(level)
        if started:
            dist.destroy_process_group()
