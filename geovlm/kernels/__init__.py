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

Importing this package imports neither transformers, trl nor numba.
"""

from . import reference
from .grpo_loss import grpo_loss
from .linear_grpo_loss import linear_grpo_loss
from .linear_logprobs import linear_selective_log_softmax
from .logprobs import SelectiveLogSoftmaxFunction, fused_log_probs, selective_log_softmax
from .options import GRPOLossOptions

__all__ = [
    "GRPOLossOptions",
    "SelectiveLogSoftmaxFunction",
    "fused_log_probs",
    "grpo_loss",
    "linear_grpo_loss",
    "linear_selective_log_softmax",
    "reference",
    "selective_log_softmax",
]
