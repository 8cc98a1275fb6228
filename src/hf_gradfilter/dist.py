"""Several processes (``torchrun`` / ``accelerate launch``): who writes, and where everyone waits.

Only what the pipeline needs around the Trainers, which do their own distributed work: rank 0
writes files shared by all, and `barrier` makes every process see them before it goes on. With
one process (or no process group) both are no-ops.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def world_size() -> int:
    """Processes in the default process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that writes shared files (``RANK`` before the group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if world_size() > 1:
        dist.barrier()
