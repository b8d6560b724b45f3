"""pytest set-up of the CPU microbenchmarks: ``make bench``, or ``pytest benchmarks [...]``.

- Collects the microbenchmark modules below (``bench_*.py`` is not a test-file pattern, so
  ``make test``, which runs ``pytest tests``, never sees them; a file named on the command line is
  collected by pytest itself). The other ``bench_*.py`` files are scripts.
- One torch thread: every method of a group runs single-threaded, as the Numba rewards and the
  Python anchors do, so that a ratio compares algorithms, not thread pools fighting over a shared
  machine's cores.
- Records in pytest-benchmark's JSON (``machine_info["geovlm"]``) what ``report.py`` prints above
  the tables: the CPU, the torch threads, the versions of ours and of the anchors.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import _provenance
import pytest
import torch

MICROBENCHMARKS = (
    "bench_grpo_loss.py",
    "bench_linear_grpo_loss.py",
    "bench_rewards_geometry.py",
    "bench_rewards_text.py",
    "bench_rewards_score.py",
    "bench_data.py",
)

# Ours and the anchors the groups time, in the order report.py lists them.
PACKAGES = (
    "torch", "numpy", "numba", "trl", "liger-kernel", "shapely", "scipy", "pycocotools",
    "pycocoevalcap", "rouge-score", "levenshtein", "sentence-transformers", "pillow",
    "pytest-benchmark",
)

torch.set_num_threads(1)


def pytest_collect_file(file_path, parent):
    if file_path.name in MICROBENCHMARKS and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["geovlm"] = {
        "machine": _provenance.cpu(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: v for p in PACKAGES if (v := _version(p)) is not None},
    }
