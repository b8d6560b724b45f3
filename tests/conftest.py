"""Suite-wide set-up that must happen before any test module imports triton.

Triton reads ``TRITON_INTERPRET`` when ``triton.jit`` decorates a kernel, so on a machine without
a GPU it is set here, before the first ``import geovlm.kernels`` of any test (the trainer tests
import the kernels too). On a CUDA machine it is left alone so that the ``cuda``-marked tests
(``benchmarks/gpu_check.sh``) compile the real kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
