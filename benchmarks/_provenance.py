"""What a RESULTS.md row names besides its numbers: the machine, the commit, the machine's load.

Shared by the benchmark scripts (``bench_trainer.py``, ``bench_sft_packing.py``, the CUDA mode of
the kernel benchmarks) and by ``conftest.py``, which records them in pytest-benchmark's JSON for
``report.py``. Standard library only, except ``torch`` for the GPU name.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as scripts, the benchmarks import the test suite's generators (``tests.test_rewards.
# adversarial``) as pytest would: from the repository root.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def cpu() -> str:
    """The CPU model and the number of cores this process may use, e.g. ``AMD EPYC 7B13, 2
    cores``."""
    model = platform.processor() or platform.machine() or "CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def machine(device: str = "cpu") -> str:
    """The GPU's name for ``device="cuda"``, else :func:`cpu`."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return cpu()


def commit() -> str:
    """The short commit of the checkout, ``+dirty`` when tracked files have changed since."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def load() -> float | None:
    """The 1-minute load average (the machine may be shared with other jobs); None where the
    platform has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def load_text() -> str:
    """:func:`load` for a printed header: ``2.7`` or ``n/a``."""
    value = load()
    return "n/a" if value is None else f"{value:.1f}"
