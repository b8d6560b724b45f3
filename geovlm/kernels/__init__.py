"""Fused GRPO-loss kernels (Triton) and their pure-torch spec.

``grpo_loss`` is a drop-in for Liger-Kernel's ``triton_grpo_loss`` over logits (its docstring says
exactly how far); ``linear_grpo_loss`` takes the hidden states and ``lm_head.weight`` instead and
never materialises the logits. Both take their options as one ``GRPOLossOptions``. Map:

    options.py          GRPOLossOptions: every loss option, default and allowed value, once
    reference.py        the spec: the GRPO math on [B, L] log-probs (TRL's loss), log-softmax,
                        entropy, the logits of hidden states; nothing else re-derives it
    logprobs.py         op: selective log-softmax over logits (Triton fwd + bwd, autograd fn)
    linear_logprobs.py  op: the same from hidden x lm_head.weight, logits never built
    grpo_loss.py        loss over logits = logprobs op + spec (Liger's signature)
    linear_grpo_loss.py loss over hidden states = linear op + spec
    _dispatch.py        one rule: CUDA -> Triton, else the spec chunk by chunk; TRITON_INTERPRET
    trl.py              adapter for TRL's GRPOTrainer (imported on its own: it imports trl)

The names below load on first use, as ``geovlm.rewards``' do, so that ``geovlm.config`` imports
``options.py`` without torch or triton. Importing this package imports neither transformers, trl
nor numba.
"""

from __future__ import annotations

import importlib
import sys
import types

# name -> the submodule that defines it (``reference`` is the submodule itself).
_EXPORTS: dict[str, str] = {
    "GRPOLossOptions": "options",
    "SelectiveLogSoftmaxFunction": "logprobs",
    "fused_log_probs": "logprobs",
    "grpo_loss": "grpo_loss",
    "linear_grpo_loss": "linear_grpo_loss",
    "linear_selective_log_softmax": "linear_logprobs",
    "reference": "reference",
    "selective_log_softmax": "logprobs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    value = module if name == "reference" else getattr(module, name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package, so ``import geovlm.kernels.grpo_loss`` would
    shadow the ``grpo_loss`` function with its module of the same name: the function stays bound.
    The module remains in ``sys.modules``: ``from geovlm.kernels.grpo_loss import ...`` works."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name != "reference" and name in _EXPORTS:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
