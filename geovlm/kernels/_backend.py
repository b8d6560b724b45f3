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


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

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
