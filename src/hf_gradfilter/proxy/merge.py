"""Several processes (torchrun / accelerate launch): the members' gradients averaged once per
optimizer step (`average_gradients`), and every process's recorded rows merged into one record
(`merge_records`), in blocks of rows so no process holds a whole record in memory.

Each process records only its slice of every global batch, NaN elsewhere, so the merge is a sum
of values and of "recorded" counts over processes: a count of 1 takes the value, 0 stays NaN, and
more than 1 means two processes recorded the same (example, member, epoch), which is an error.
"""

from __future__ import annotations

import numpy as np
import torch

GATHER_CHUNK_VALUES = 1 << 20  # values per all-reduce when merging the processes' records (4 MB of float32)


def average_gradients(parameters, world_size: int) -> None:
    """Average the ``.grad`` of ``parameters`` over the processes, in place (one all-reduce in all)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in parameters if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def merge_records(local, merged, device) -> None:
    """Fill ``merged`` with every process's recorded values of ``local`` (`GradientRecord` objects of the
    same rows; a collective call: every process takes part, with its own ``local``).

    Merges ``sketches`` too when the records have them (a member mean, ``sketch_storage="mean"``, is a sum of the
    processes' parts: several may have added to one row). Runs in blocks of about `GATHER_CHUNK_VALUES`
    values (two all-reduces each: the values with NaN as 0, and how many processes recorded each).
    Raises RuntimeError, naming the example ids, if any (example, member, epoch) was recorded by more
    than one process.
    """
    keys = ("norms", "losses", "cosines") + (("sketches",) if local.sketches is not None else ())
    mean = local.sketches is not None and local.metadata.get("sketch", {}).get("storage") == "mean"
    for key in keys:
        source, target = getattr(local, key), getattr(merged, key)
        summed = key == "sketches" and mean
        step = max(1, GATHER_CHUNK_VALUES // int(np.prod(source.shape[1:])))  # rows per all-reduce
        for start in range(0, local.num_examples, step):
            block = torch.from_numpy(np.array(source[start : start + step], dtype=np.float32))
            values = torch.nan_to_num(block, nan=0.0).to(device)
            counts = (~torch.isnan(block)).to(torch.int32).to(device)
            torch.distributed.all_reduce(values)
            torch.distributed.all_reduce(counts)
            values, counts = values.cpu().numpy(), counts.cpu().numpy()
            if (counts > 1).any() and not summed:
                rows = local.example_id[start + np.unique(np.nonzero(counts > 1)[0])][:10].tolist()
                raise RuntimeError(f"Example id(s) {rows} were recorded by more than one process.")
            target[start : start + step] = np.where(counts == 1 if not summed else counts >= 1, values, np.nan)
