"""GRPO loss straight from hidden states and the lm_head weight: the [N, V] logits never exist.

    linear_selective_log_softmax(hidden [N, H] | [B, L, H], weight [V, H], ids [N] | [B, L],
                                 bias [V] | None, temperature, return_entropy)
        -> logp shaped like ids (fp32), and the entropy of softmax(z) (fp32) if asked
    linear_grpo_loss(hidden, weight, completion_ids [B, L], advantages [B], ...GRPO options...)
        -> (loss scalar fp32, metrics dict), the loss of `reference.grpo_loss_from_logps`

z = (hidden @ weight^T + bias) / temperature. The log-softmax is an autograd Function whose
forward saves only hidden, weight, ids, bias (references, no copies) and lse [N] (plus
E_p[z] [N] when the entropy is returned); its backward recomputes the logits block by block
and returns exact gradients for hidden, weight and bias, in their own dtypes. A weight shared
with the input embedding (tied embeddings) simply receives this gradient on top of the
embedding's. `linear_grpo_loss` composes it with `reference.grpo_loss_from_logps`, the one
definition of the GRPO math shared with the logits kernel: autograd hands dLoss/dlogp [N] to
the backward here, so the two kernels cannot drift.

Dispatch: CUDA tensors run the Triton kernels of `_linear_triton` (vocab-tiled matmul with the
logsumexp and target gather in the epilogue); CPU tensors run the chunked fp32 torch code of
`_linear_torch`. Without autograd (reference / old policy log-probs) nothing is saved.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Literal

import torch

from geovlm.kernels import _linear_torch
from geovlm.kernels.reference import grpo_loss_from_logps

Backend = Literal["auto", "triton", "torch"]

# Budget of the one vocab-chunk logit-gradient buffer G [N, chunk] of the Triton backward.
_GRAD_CHUNK_BYTES = 1 << 30
# Chunk widths are powers of two times this: chunk edges stay tile-aligned and only a few
# distinct widths (kernel specialisations) occur as N varies between steps.
_CHUNK_ALIGN = 256
# Vocab columns per block of the torch path (1024 tokens x 4096 columns fp32 = 16 MiB).
_TORCH_VOCAB_CHUNK = 4096


def _backend_module(backend: Backend, device: torch.device) -> ModuleType:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return _linear_torch
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}"
        )
    # Imported on first use so that CPU-only installs never need Triton.
    from geovlm.kernels import _linear_triton

    return _linear_triton


def _vocab_chunk(
    impl: ModuleType, n: int, v: int, dtype: torch.dtype, requested: int | None
) -> int:
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise ValueError(f"vocab_chunk_size must be a positive int, got {requested!r}")
        return min(requested, v)
    if impl is _linear_torch:
        return min(_TORCH_VOCAB_CHUNK, v)
    width = _CHUNK_ALIGN
    per_column = max(n, 1) * dtype.itemsize
    while width * 2 * per_column <= _GRAD_CHUNK_BYTES and width < v:
        width *= 2
    return min(width, v)


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> None:
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(
            f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., H] must end in H = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    n = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    if tuple(hidden.shape[:-1]) != tuple(ids.shape) and not (
        hidden.dim() == 2 and ids.numel() == n
    ):
        raise ValueError(
            f"ids {tuple(ids.shape)} must match hidden {tuple(hidden.shape)} without its last "
            "dimension (or hidden may be [N, H] with ids.numel() == N)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    devices = {t.device for t in (hidden, weight, ids) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, ids and bias must share a device, got {devices}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if ids.numel() and bool(((ids < 0) | (ids >= weight.shape[0])).any()):
        bad = ids[(ids < 0) | (ids >= weight.shape[0])]
        raise ValueError(
            f"token ids must lie in [0, V = {weight.shape[0]}); got {bad.numel()} outside, "
            f"e.g. {bad[0].item()}"
        )


class _LinearLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, bias, temperature, return_entropy, impl, vocab_chunk):
        logp, lse, entropy, mean = impl.forward(
            hidden, weight, ids, bias, temperature, return_entropy, vocab_chunk
        )
        ctx.save_for_backward(hidden, weight, ids, bias, lse, mean)
        ctx.impl = impl
        ctx.temperature = temperature
        ctx.vocab_chunk = vocab_chunk
        # An unused output (e.g. the entropy, logged only) gets None, not a zero tensor.
        ctx.set_materialize_grads(False)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, ids, bias, lse, mean = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
        need = ctx.needs_input_grad
        grad_hidden, grad_weight, grad_bias = ctx.impl.backward(
            hidden, weight, ids, bias, ctx.temperature, lse,
            grad_logp.float().contiguous(), grad_entropy, mean, ctx.vocab_chunk,
            need[0], need[1], need[3],
        )
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None


def linear_selective_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    vocab_chunk_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[..., ids]`` without the logits.

    hidden ``[..., H]`` (or ``[N, H]`` with ``ids.numel() == N``), weight ``[V, H]``, ids integer
    in ``[0, V)``, bias ``[V]``. Returns fp32 log-probs shaped like ``ids``, and with
    ``return_entropy`` also the fp32 entropy of each row's softmax (differentiable too).
    ``vocab_chunk_size`` bounds the vocabulary columns handled per pass (default: the Triton
    path sizes it so its gradient buffer stays under 1 GiB); ``backend`` forces a path.
    """
    _check_inputs(hidden, weight, ids, bias, temperature)
    impl = _backend_module(backend, hidden.device)
    out_shape = ids.shape
    h2d = hidden.reshape(-1, hidden.shape[-1])
    if h2d.shape[0] == 0:
        # No tokens: nothing to launch (a zero-size grid), the torch path returns the empties.
        impl = _linear_torch
    flat_ids = ids.reshape(-1).to(torch.int64).contiguous()
    chunk = _vocab_chunk(impl, h2d.shape[0], weight.shape[0], hidden.dtype, vocab_chunk_size)
    temperature = float(temperature)
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if wants_grad:
        out = _LinearLogSoftmax.apply(
            h2d, weight, flat_ids, bias, temperature, return_entropy, impl, chunk
        )
    else:
        logp, _, entropy, _ = impl.forward(
            h2d, weight, flat_ids, bias, temperature, return_entropy, chunk
        )
        out = (logp, entropy) if return_entropy else logp
    if return_entropy:
        return out[0].view(out_shape), out[1].view(out_shape)
    return out.view(out_shape)


def _align_hidden(hidden: torch.Tensor, b: int, seq: int) -> torch.Tensor:
    """[B, L, H], [B, L + 1, H] (the logits kernel's layout: the last position is dropped) or
    [B * L, H] -> [B, L, H]."""
    if hidden.dim() == 3 and hidden.shape[0] == b and hidden.shape[1] in (seq, seq + 1):
        return hidden[:, :seq]
    if hidden.dim() == 2 and hidden.shape[0] == b * seq:
        return hidden.view(b, seq, hidden.shape[1])
    raise ValueError(
        f"hidden must be [B, L, H], [B, L + 1, H] or [B * L, H] for completion_ids [B, L] = "
        f"[{b}, {seq}], got {tuple(hidden.shape)}"
    )


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 0.9,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.4,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vllm_is_ratio: torch.Tensor | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    vocab_chunk_size: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss from the policy's last hidden states and ``lm_head.weight``.

    hidden ``[B, L, H]`` aligned with ``completion_ids [B, L]`` (``[B, L + 1, H]`` and
    ``[B * L, H]`` are accepted too), weight ``[V, H]``, advantages ``[B]``; ``old_logp``,
    ``ref_logp``, ``completion_mask`` ``[B, L]``. The GRPO options are those of
    ``reference.grpo_loss_from_logps``, with the names and defaults of the logits kernel
    ``grpo_loss`` (Liger's ``triton_grpo_loss``, temperature 0.9 included). Ids at masked
    positions are never read (padding may hold any value). Returns ``(loss, metrics)``.
    """
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be [B, L], got {tuple(completion_ids.shape)}")
    b, seq = completion_ids.shape
    hidden = _align_hidden(hidden, b, seq)
    if completion_mask is not None:
        if tuple(completion_mask.shape) != (b, seq):
            raise ValueError(
                f"completion_mask must be [B, L] = [{b}, {seq}], got {tuple(completion_mask.shape)}"
            )
        completion_ids = torch.where(
            completion_mask.to(torch.bool), completion_ids, torch.zeros_like(completion_ids)
        )
    logp = linear_selective_log_softmax(
        hidden, weight, completion_ids, bias, temperature,
        vocab_chunk_size=vocab_chunk_size, backend=backend,
    )
    return grpo_loss_from_logps(
        logp, old_logp, ref_logp, advantages, completion_mask,
        beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length, delta=delta,
        use_bias_correction_kl=use_bias_correction_kl, vllm_is_ratio=vllm_is_ratio,
        num_items_in_batch=num_items_in_batch,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg,
    )
