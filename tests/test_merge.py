"""Merging the processes' records (2 CPU processes, gloo): each row from the process that recorded it,
NaN where none did, an error naming the rows two processes both recorded; gradients averaged."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch import free_port

from hf_gradfilter.proxy import merge
from hf_gradfilter.proxy.record import GradientRecord

pytestmark = pytest.mark.slow  # torchrun: `pytest -m 'not slow'` skips it

N, M, E = 11, 2, 3


def local_record(rank: int, overlap: bool) -> GradientRecord:
    """Rank 0 recorded the even rows, rank 1 the odd ones (and, with ``overlap``, row 4 too)."""
    record = GradientRecord.empty(np.arange(N) * 10, np.arange(N), M, E)
    rows = [i for i in range(N) if i % 2 == rank] + ([4] if overlap and rank == 1 else [])
    for key, offset in (("norms", 0.0), ("losses", 100.0), ("cosines", 0.5)):
        getattr(record, key)[rows] = np.arange(N * M * E, dtype=np.float32).reshape(N, M, E)[rows] + offset
    record.norms[0, 1, 2] = np.nan  # one value nobody recorded
    return record


def _worker(rank: int, port: int, out: str, overlap: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    merge.GATHER_CHUNK_VALUES = 12  # two rows per all-reduce: the merge runs in several blocks
    local = local_record(rank, overlap)
    merged = GradientRecord.empty(local.example_id, local.row_hash, M, E)
    result = {}
    try:
        merge.merge_records(local, merged, torch.device("cpu"))
        result["merged"] = {k: getattr(merged, k).tolist() for k in ("norms", "losses", "cosines")}
    except RuntimeError as err:
        result["error"] = str(err)
    grad = torch.nn.Parameter(torch.zeros(3))
    grad.grad = torch.full((3,), float(rank + 1))  # 1 and 2: the mean is 1.5
    merge.average_gradients([grad, torch.nn.Parameter(torch.zeros(1))], 2)  # a parameter without .grad is skipped
    result["grad"] = grad.grad.tolist()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def run(tmp_path, overlap: bool) -> list[dict]:
    mp.spawn(_worker, args=(free_port(), str(tmp_path), overlap), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_process_gets_each_row_from_the_process_that_recorded_it(tmp_path):
    ranks = run(tmp_path, overlap=False)
    full = np.arange(N * M * E, dtype=np.float32).reshape(N, M, E)
    for result in ranks:
        norms = np.array(result["merged"]["norms"], dtype=np.float32)
        assert np.isnan(norms[0, 1, 2]) and np.isnan(norms).sum() == 1
        norms[0, 1, 2] = full[0, 1, 2]
        np.testing.assert_array_equal(norms, full)
        np.testing.assert_array_equal(result["merged"]["losses"], full + 100.0)
        np.testing.assert_array_equal(result["merged"]["cosines"], full + 0.5)
        assert result["grad"] == [1.5, 1.5, 1.5]


def test_a_row_recorded_by_two_processes_is_an_error_naming_its_example_id(tmp_path):
    ranks = run(tmp_path, overlap=True)
    assert all(r["error"] == "Example id(s) [40] were recorded by more than one process." for r in ranks)
