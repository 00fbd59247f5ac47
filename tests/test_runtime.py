"""Runtime helpers (glad_core/runtime.py): the data-loader workers chosen per device."""
from __future__ import annotations

import os

import pytest
import torch

from glad_core.config import TrainConfig
from glad_core.runtime import MAX_WORKERS, loader_options, worker_count


def test_auto_workers_are_none_on_cpu_and_the_cores_but_one_on_cuda(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert worker_count("auto", cpu) == 0 and loader_options("auto", cpu) == {"num_workers": 0, "pin_memory": False}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # a cluster worker's share of the cores
    assert loader_options("auto", cuda) == {"num_workers": 3, "pin_memory": True}
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert worker_count("auto", cuda) == MAX_WORKERS
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_count("auto", cuda) == 0
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert worker_count("auto", cuda) == min(MAX_WORKERS, len(os.sched_getaffinity(0)) - 1)
    assert worker_count(2, cpu) == 2 and worker_count(0, cuda) == 0  # a number is taken as given


def test_num_workers_takes_auto_or_a_count():
    assert TrainConfig(method="coop").num_workers == "auto" and TrainConfig(method="coop", num_workers=3).num_workers == 3
    for bad in (-1, "four", True):
        with pytest.raises(ValueError, match="num_workers"):
            TrainConfig(method="coop", num_workers=bad)
