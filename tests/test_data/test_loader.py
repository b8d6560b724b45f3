"""Background batch preparation: the same batches, in the same order, as building them inline."""

from __future__ import annotations

import os

import pytest
import torch

from geovlm.data.loader import auto_workers, prefetched


def build(step: int) -> dict:
    # Seeded per step, like a stage's batch: a pure function of the step.
    gen = torch.Generator().manual_seed(step)
    return {"step": step, "x": torch.randn(3, 5, generator=gen), "pid": os.getpid()}


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_inline_batches_in_order(workers):
    steps = range(3, 11)
    inline = list(prefetched(build, steps, 0))
    background = list(prefetched(build, steps, workers))
    assert [b["step"] for b in background] == list(steps)
    for a, b in zip(inline, background, strict=True):
        torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=0)
    assert all(b["pid"] != os.getpid() for b in background)
    assert all(a["pid"] == os.getpid() for a in inline)


def test_no_steps_no_workers():
    assert list(prefetched(build, range(5, 5), 2)) == []


def test_worker_counts():
    assert auto_workers(torch.device("cpu"), 3) == 3
    assert auto_workers(torch.device("cuda"), 0) == 0
    assert 0 <= auto_workers(torch.device("cpu")) <= 1
    assert 0 <= auto_workers(torch.device("cuda")) <= 4
    with pytest.raises(ValueError, match="data.workers"):
        auto_workers(torch.device("cpu"), -1)
