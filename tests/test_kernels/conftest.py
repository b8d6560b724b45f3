"""Kernel tests run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

``tests/conftest.py`` sets ``TRITON_INTERPRET`` before any test imports triton; the markers here
say which tests need the interpreter or a GPU.
"""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
