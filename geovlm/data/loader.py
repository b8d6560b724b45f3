"""Batches prepared ahead of time in background workers, in step order, deterministic.

A stage's batch for step ``s`` is a pure function of ``s`` (``geovlm.loop.batch_indices`` and the
step seed), so a worker can build it before the training loop asks for it: decoding images,
resizing them, applying the chat template and tokenising (``geovlm.data.collate``) then overlap
with the model's forward and backward instead of stalling them. ``prefetched(build, steps,
workers)`` yields ``build(step)`` for every step of ``steps`` in order; with ``workers=0`` it
calls ``build`` inline (the same batches, no processes), which is also what a resumed run gets
for the steps it replays.

Workers are a ``torch.utils.data.DataLoader`` over the steps (``batch_size=None``: one item is
one step's whole batch), started with ``fork`` so that the samples, their in-memory images and
the processor are inherited instead of pickled; each worker runs single-threaded, so that it
takes one core and leaves the others to the training process.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from geovlm.runtime import processes_sharing_cpus, usable_cpus

T = TypeVar("T")


class _Steps(Dataset):
    """Item ``i`` is ``build(steps[i])``."""

    def __init__(self, build: Callable[[int], object], steps: Sequence[int]):
        self.build = build
        self.steps = list(steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> object:
        return self.build(self.steps[index])


def _worker_init(_: int) -> None:
    """One thread, and no encoding cache: a worker prepares batches off the critical path, and
    each worker's own cache would hold another copy of the encodings."""
    from geovlm.data.encoding_cache import SHARED

    torch.set_num_threads(1)
    SHARED.resize(0)


def auto_workers(device: torch.device, requested: int | None = None) -> int:
    """Background workers for batch preparation: ``requested`` when given; else, on CUDA, up to
    4 of the CPUs this process may use; on CPU, one worker when at least 3 CPUs are this
    process's share (the training threads need the cores otherwise)."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"data.workers must be >= 0, got {requested}")
        return requested
    share = usable_cpus() // processes_sharing_cpus()
    if device.type == "cuda":
        return max(0, min(4, share - 1))
    return 1 if share >= 3 else 0


def prefetched(
    build: Callable[[int], T], steps: Sequence[int], workers: int, prefetch: int = 2
) -> Iterator[T]:
    """``build(step)`` for every step, in order; ``workers`` > 0 build ``prefetch`` batches each
    ahead of the loop in background processes."""
    if workers == 0 or len(steps) == 0:
        for step in steps:
            yield build(step)
        return
    context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    loader = DataLoader(
        _Steps(build, steps),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=prefetch,
        worker_init_fn=_worker_init,
        multiprocessing_context=context,
    )
    yield from loader
