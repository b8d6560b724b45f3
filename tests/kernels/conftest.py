"""Kernel tests run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates a kernel, i.e. before
``geovlm.kernels`` is imported, hence here. On a CUDA machine it is left alone so that the
``cuda``-marked tests (run by ``benchmarks/gpu_check.sh``) compile the real kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
