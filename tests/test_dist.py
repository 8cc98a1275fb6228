"""`dist.main_decides`: every process takes rank 0's answer, and only rank 0 is asked (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from launch import free_port

from hf_gradfilter.dist import barrier, is_main_process, main_decides, world_size

pytestmark = pytest.mark.slow  # torchrun: `pytest -m 'not slow'` skips it


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    asked = []

    def question(answer):
        def ask():
            asked.append(answer)
            return answer
        return ask

    seen = {"world": world_size(), "main": is_main_process(),
            # rank 0 says yes, rank 1 would say no: both must take yes; then the other way round
            "first": main_decides(question(rank == 0)), "second": main_decides(question(rank == 1))}
    barrier()
    seen["asked"] = asked
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


def test_every_process_takes_rank_zeros_answer_and_only_rank_zero_is_asked(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["main"] for r in ranks] == [True, False]
    assert [(r["first"], r["second"]) for r in ranks] == [(True, False), (True, False)]
    assert ranks[0]["asked"] == [True, False] and ranks[1]["asked"] == []


def test_one_process_asks_itself():
    assert main_decides(lambda: True) is True and main_decides(lambda: False) is False
    assert world_size() == 1 and is_main_process()
