"""Which implementation runs a kernel call: Triton or the chunked torch path.

``backend="auto"`` sends CUDA tensors to Triton and everything else to torch. ``"triton"``
forces Triton; on CPU tensors that only works through Triton's interpreter, i.e. when
``TRITON_INTERPRET=1`` was set before ``geovlm.kernels`` was imported (the kernel is then an
``InterpretedFunction``).
``"torch"`` forces the torch path on any device.
"""

from __future__ import annotations

import torch

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


# Vocab block of the single configuration used under the interpreter: small enough that the test
# shapes (V ~ 1000) take several blocks and a ragged tail, so the online rescaling is exercised.
INTERPRETER_BLOCK_V = 512


def interpreting() -> bool:
    """Whether kernels decorated now run in Triton's interpreter (``TRITON_INTERPRET``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        import os

        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def vocab_configs(gpu: list[tuple[int, int]]) -> list:
    """Autotuning candidates ``(BLOCK_V, num_warps)`` for a one-program-per-row vocab kernel; a
    single small configuration under the interpreter (nothing to tune, and it is slow)."""
    import triton

    if interpreting():
        return [triton.Config({"BLOCK_V": INTERPRETER_BLOCK_V}, num_warps=1)]
    return [triton.Config({"BLOCK_V": block}, num_warps=warps) for block, warps in gpu]


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (possibly autotuned) was decorated under the interpreter, i.e. runs on
    CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def use_triton(backend: str, tensor: torch.Tensor, kernel: object) -> bool:
    """True when ``tensor``'s call should launch the Triton ``kernel``; errors name the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda
    if tensor.is_cuda or (tensor.device.type == "cpu" and is_interpreted(kernel)):
        return True
    raise ValueError(
        f"backend='triton' needs CUDA tensors (got {tensor.device}), or CPU tensors with "
        "TRITON_INTERPRET=1 set before geovlm.kernels is imported"
    )
