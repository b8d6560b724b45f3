"""Kernel tests run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

``tests/conftest.py`` sets ``TRITON_INTERPRET`` before any test imports triton; the markers here
say which tests need the interpreter or a GPU. Whether the interpreter is on is read the one way
the package reads it (``geovlm.kernels._dispatch.interpreting``).
"""

import pytest
import torch

from geovlm.kernels._dispatch import interpreting

INTERPRETED = interpreting()

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
