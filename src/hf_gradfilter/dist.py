"""Several processes (``torchrun`` / ``accelerate launch``): who writes, and where everyone waits.

Only what the pipeline needs around the Trainers, which do their own distributed work: rank 0
writes files shared by all (``output_dir`` must be on a filesystem every process sees), `barrier`
makes every process see them before it goes on, and `main_decides` gives every process rank 0's
answer to a yes/no question, so all take the same branch even if their views of the disk differ.
With one process (or no process group) these are no-ops.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
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


def main_decides(question: Callable[[], bool]) -> bool:
    """``question()`` asked on rank 0 and its answer sent to every process (one broadcast of one
    integer; the other ranks do not call ``question``). Every process must call this together."""
    if world_size() == 1:
        return bool(question())
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    answer = torch.tensor([int(bool(question())) if dist.get_rank() == 0 else 0], device=device)
    dist.broadcast(answer, src=0)
    return bool(answer.item())
