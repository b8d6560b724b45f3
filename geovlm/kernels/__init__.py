"""Fused GRPO-loss kernels (Triton) and their pure-torch reference.

``grpo_loss`` is a drop-in for Liger-Kernel's ``triton_grpo_loss`` (same arguments) over logits;
``linear_grpo_loss`` takes the hidden states and ``lm_head.weight`` instead and never materialises
the logits. The GRPO math of both is ``reference.grpo_loss_from_logps``, TRL's loss as a function
of per-token log-probs.
CUDA tensors run Triton, CPU tensors a chunked torch path. ``geovlm.kernels.trl`` (imported on
its own) plugs the fused loss into TRL's ``GRPOTrainer``. Importing this package imports neither
transformers, trl nor numba.
"""

from . import reference
from .grpo_loss import SelectiveLogSoftmaxFunction, fused_log_probs, grpo_loss
from .linear_grpo_loss import linear_grpo_loss, linear_selective_log_softmax
from .logprobs import selective_log_softmax

__all__ = [
    "SelectiveLogSoftmaxFunction",
    "fused_log_probs",
    "grpo_loss",
    "linear_grpo_loss",
    "linear_selective_log_softmax",
    "reference",
    "selective_log_softmax",
]
