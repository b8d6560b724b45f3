"""Suite-wide set-up that must happen before any test module imports triton, and the default
selection of tests.

Triton reads ``TRITON_INTERPRET`` when ``triton.jit`` decorates a kernel, so on a machine without
a GPU it is set here, before the first ``import geovlm.kernels`` of any test (the trainer tests
import the kernels too). On a CUDA machine it is left alone so that the ``cuda``-marked tests
(``benchmarks/gpu_check.sh``) compile the real kernels.

Tests marked ``compile_matrix`` (every Triton kernel config compiled for sm_80 / sm_90, tens of
minutes) are left out unless the ``-m`` expression names the marker (``make compile-check``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

OPT_IN_MARKERS = ("compile_matrix",)


def pytest_collection_modifyitems(config, items):
    named = config.getoption("markexpr") or ""
    skipped = [m for m in OPT_IN_MARKERS if m not in named]
    kept, deselected = [], []
    for item in items:
        opted_out = any(item.get_closest_marker(m) for m in skipped)
        (deselected if opted_out else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
