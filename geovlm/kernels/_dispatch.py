"""Which implementation runs a kernel call: Triton, or the spec (``reference.py``) chunk by chunk.

One rule for every op. ``backend="auto"`` sends CUDA tensors of a dtype the kernels take (bf16,
fp16, fp32) to Triton, and everything else -- CPU tensors, fp64 -- to the spec, evaluated a few
rows at a time (``row_chunks``) so that memory stays bounded whatever the vocabulary. ``"triton"``
forces the kernels: on CPU tensors that works only through Triton's interpreter. ``"torch"``
forces the spec on any device.

``TRITON_INTERPRET`` is read in one place, ``interpreting()``, which asks Triton itself (so
``1``, ``true``, ``on`` and ``yes`` mean the same here as to Triton). Triton reads it when
``triton.jit`` decorates a kernel, i.e. when an op's module is first imported (the package loads
them on first use): a kernel decorated under the interpreter is an ``InterpretedFunction`` and
runs on CPU tensors, and ``is_interpreted`` asks the kernel rather than the environment, which
may have changed since.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
Backend = Literal[BACKENDS]  # type: ignore[valid-type]
# Element types the Triton kernels load (their math is fp32 throughout).
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

# Vocab block of the single configuration used under the interpreter: small enough that the test
# shapes (V ~ 1000) take several blocks and a ragged tail, so the online rescaling is exercised.
INTERPRETER_BLOCK_V = 512

# Elements of one row chunk of the spec path ([rows, V] in fp32: 64 MiB).
CHUNK_ELEMENTS = 1 << 24


def interpreting() -> bool:
    """Whether kernels decorated now run in Triton's interpreter (``TRITON_INTERPRET``)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (possibly autotuned) was decorated under the interpreter, i.e. runs on
    CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def vocab_configs(gpu: list[tuple[int, int]]) -> list:
    """Autotuning candidates ``(BLOCK_V, num_warps)`` for a one-program-per-row vocab kernel; a
    single small configuration under the interpreter (nothing to tune, and it is slow)."""
    import triton

    if interpreting():
        return [triton.Config({"BLOCK_V": INTERPRETER_BLOCK_V}, num_warps=1)]
    return [triton.Config({"BLOCK_V": block}, num_warps=warps) for block, warps in gpu]


def use_triton(backend: str, tensor: torch.Tensor, kernel: object) -> bool:
    """True when the call on ``tensor`` should launch the Triton ``kernel``; errors name the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and tensor.dtype in TRITON_DTYPES
    if not (tensor.is_cuda or (tensor.device.type == "cpu" and is_interpreted(kernel))):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {tensor.device}), or CPU tensors with "
            "TRITON_INTERPRET=1 set before geovlm.kernels is imported"
        )
    if tensor.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' takes {[str(d) for d in TRITON_DTYPES]} inputs, got "
            f"{tensor.dtype}; backend='auto' or 'torch' evaluates the spec in it"
        )
    return True


def row_chunks(n_rows: int, width: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``CHUNK_ELEMENTS`` elements of ``width`` each (at least
    one row per slice): the spec path's unit of work."""
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))
