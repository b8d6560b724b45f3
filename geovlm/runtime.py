"""Where this process runs: rank, world size, device, CPU threads, seeds, and the collectives.

``start(device, backend, threads)`` is the one place train and eval find out who they are:

- under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group (NCCL on CUDA, Gloo on CPU)
  and pins ``LOCAL_RANK``'s GPU; without it the process is rank 0 of 1;
- it picks the number of CPU threads torch's intra-op pool uses (``cpu_threads``);
- ``Runtime`` holds the answers; the collectives below are identities in a single process.

CPU threads. torch's intra-op pool synchronises its threads at every op, so a pool with more
threads than the cores actually free stalls whenever another process takes one: on 2 cores with
one other CPU-bound process, 8 tiny-model SFT steps took 72 s with 2 threads and 15 s with 1.
The automatic count is therefore the CPUs this process may use (affinity mask and cgroup quota),
shared among the processes of this machine that run the same job (torchrun's local ranks,
pytest-xdist workers), minus the cores other processes keep busy when we start (their non-idle
share over a tenth of a second, from /proc/stat; the 1-minute load average elsewhere), and never
less than 1.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class RuntimeSetupError(ValueError):
    """A device or launch setting this machine cannot honour; the message says which."""


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run.

    Attributes:
        rank / world_size: global rank and number of processes (0 / 1 without torchrun).
        local_rank: rank on this machine (its GPU index on CUDA).
        device: the torch device it computes on.
        threads: torch intra-op threads (CPU work; 1 when computing on CUDA).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    threads: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# --------------------------------------------------------------------------- CPUs


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 ``cpu.max``, v1 ``cfs_quota``), or None."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def processes_sharing_cpus() -> int:
    """Processes of this job on this machine: torchrun's local ranks times pytest-xdist workers."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, local) * max(1, workers)


def busy_cpus(interval: float = 0.1, stat: Path = Path("/proc/stat")) -> float | None:
    """CPUs' worth of work the rest of the machine is doing now on the CPUs this process may use:
    their non-idle share over ``interval`` seconds (``/proc/stat``), times ``usable_cpus()``.

    None where ``/proc/stat`` cannot be read. Unlike the load average, which is a one-minute
    moving average, this does not count processes that ended seconds ago (a ``pip install``
    just before ``make train``) nor miss ones that just started.
    """
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None

    def sample() -> dict[int, tuple[int, int]]:
        """cpu index -> (idle + iowait ticks, all ticks)."""
        rows = {}
        for line in stat.read_text().splitlines():
            name, _, rest = line.partition(" ")
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(value) for value in rest.split()[:8]]
                rows[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
        return rows

    try:
        before = sample()
        time.sleep(interval)
        after = sample()
    except (OSError, ValueError, IndexError):
        return None
    cpus = [c for c in before if c in after and (allowed is None or c in allowed)]
    shares = []
    for c in cpus:
        total = after[c][1] - before[c][1]
        if total > 0:
            shares.append(1.0 - (after[c][0] - before[c][0]) / total)
    if not shares:
        return None
    return sum(shares) / len(shares) * usable_cpus()


def cpu_threads(requested: int | None = None, busy: float | None = None) -> int:
    """Intra-op threads for CPU work: ``requested`` if given, else this process's share of the
    usable CPUs minus those other processes keep busy (``busy``: CPUs' worth, measured by
    ``busy_cpus`` when not given, the one-minute load average where that cannot be read)."""
    if requested is not None:
        if requested < 1:
            raise RuntimeSetupError(f"threads must be >= 1, got {requested}")
        return requested
    sharing = processes_sharing_cpus()
    if busy is None:
        busy = busy_cpus()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    # The other processes of this job (torchrun ranks, pytest-xdist workers) are counted in
    # ``busy`` already: they are not "elsewhere".
    busy_elsewhere = max(0, round(busy) - (sharing - 1))
    return max(1, (usable_cpus() - busy_elsewhere) // sharing)


# --------------------------------------------------------------------------- start


def start(device: str = "auto", backend: str = "auto", threads: int | None = None) -> Runtime:
    """Join torchrun's process group if launched by it, pick the device and the CPU threads.

    ``device``: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``; ``backend``: the
    process-group backend, ``"auto"`` = NCCL on CUDA, Gloo on CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise RuntimeSetupError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeSetupError("device=cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if use_cuda:
        chosen = cpu_threads(threads) if threads is not None else 1
        where = torch.device("cuda", local_rank)
    else:
        chosen = cpu_threads(threads)
        where = torch.device("cpu")
    torch.set_num_threads(chosen)
    return Runtime(rank, world, local_rank, where, chosen)


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- collectives


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: float | int) -> float | int:
    """Sum a Python number over ranks (identity when single-process)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return int(round(tensor.item())) if isinstance(value, int) else tensor.item()


def reduce_metrics(
    values: dict[str, float], weights: dict[str, float] | None = None
) -> dict[str, float]:
    """Combine per-rank metrics into the metrics of the global batch (identity single-process).

    Keys ending in ``_min`` / ``_max`` take the minimum / maximum over ranks, ignoring NaN (TRL's
    ``nanmin`` / ``nanmax`` of the gathered values). Every other key is a mean: weighted by
    ``weights[key]`` (e.g. this rank's token count for a token mean, which makes it the token mean
    of the whole batch), else by 1 (a mean over ranks that hold equally many rows).
    """
    if not is_distributed() or not values:
        return dict(values)
    weights = weights or {}
    device = _collective_device()
    keys = sorted(values)
    extremes = [k for k in keys if k.endswith(("_min", "_max"))]
    means = [k for k in keys if k not in extremes]
    out: dict[str, float] = {}
    if means:
        w = [float(weights.get(k, 1.0)) for k in means]
        packed = [w_k * float(values[k]) for k, w_k in zip(means, w, strict=True)] + w
        tensor = torch.tensor(packed, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        sums, totals = tensor[: len(means)], tensor[len(means) :]
        for i, key in enumerate(means):
            total = float(totals[i])
            out[key] = float(sums[i]) / total if total > 0 else math.nan
    for key in extremes:
        largest = key.endswith("_max")
        value = float(values[key])
        # NaN (no valid sequence on this rank) must not win the comparison.
        fill = -math.inf if largest else math.inf
        tensor = torch.tensor(
            [fill if math.isnan(value) else value], dtype=torch.float64, device=device
        )
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.MIN)
        result = float(tensor)
        out[key] = result if math.isfinite(result) else math.nan
    return out


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled; identity when single-process)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _concat_tree(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        return {k: _concat_tree([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple | list):
        return type(first)(_concat_tree([p[i] for p in parts]) for i in range(len(first)))
    return np.concatenate([np.asarray(p) for p in parts])


def gather_rows(tree: Any) -> Any:
    """Concatenate per-rank 1-D arrays (leaves of tuples / lists / dicts) in rank order.

    The result is what a single process holding the global batch would have (ranks hold
    contiguous shards). Meant for small per-row values such as rewards; identity when
    single-process.
    """
    if not is_distributed():
        return tree
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tree)
    return _concat_tree(parts)
