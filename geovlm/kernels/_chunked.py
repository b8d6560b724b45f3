"""Chunked torch path of the vocab-sized work, for tensors the Triton kernels do not take (CPU).

Same math and same saved statistics as the Triton kernels, one chunk of rows at a time so the fp32
temporaries stay under ``CHUNK_ELEMENTS`` elements whatever the vocabulary size:

* ``forward_stats``: logits ``[B, T, V]`` (T = L or L + 1; positions >= L are ignored), ids
  ``[B, L]`` -> log-prob of each id ``[B, L]``, row max ``m`` and ``log sum exp(x - m)``
  ``[B, L]`` (x = logits / temperature), optional entropy ``[B, L]``.
* ``grad_logits``: writes ``g * (onehot(id) - softmax(x)) / temperature`` into ``out [B, T, V]``
  from the saved statistics (zero for positions >= L and where ``g == 0``).

Log-probs are computed in the promoted dtype of the logits and fp32 (fp64 stays fp64).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _shifted(chunk: torch.Tensor, temperature: float, dtype: torch.dtype):
    """``(x - m, m)`` with ``m`` the row max, taken as 0 for a row that is all -inf."""
    x = chunk.to(dtype) / temperature
    m = x.amax(-1, keepdim=True)
    m = torch.where(m == -float("inf"), torch.zeros_like(m), m)
    return x - m, m


def forward_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    b, seq = ids.shape
    vocab = logits.shape[-1]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.zeros(b, seq, dtype=dtype, device=logits.device)
    row_max = torch.zeros_like(logp)
    log_sum = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if with_entropy else None
    step = _rows_per_chunk(vocab)
    idx = ids.long()
    in_range = (idx >= 0) & (idx < vocab)
    safe_idx = torch.where(in_range, idx, torch.zeros_like(idx))
    for i in range(b):
        for j in range(0, seq, step):
            k = min(j + step, seq)
            z, m = _shifted(logits[i, j:k], temperature, dtype)
            e = torch.exp(z)
            s = e.sum(-1)
            ls = torch.log(s)
            target = z.gather(-1, safe_idx[i, j:k, None])[:, 0]
            logp[i, j:k] = torch.where(in_range[i, j:k], target - ls, float("nan"))
            row_max[i, j:k] = m[:, 0]
            log_sum[i, j:k] = ls
            if entropy is not None:
                ez = torch.where(e > 0, e * z, torch.zeros_like(e)).sum(-1)
                entropy[i, j:k] = ls - ez / s
    if mask is not None:
        # Masked rows are defined as 0 (the Triton kernel never reads them).
        keep = mask != 0
        for t in (logp, row_max, log_sum) + ((entropy,) if entropy is not None else ()):
            t.masked_fill_(~keep, 0.0)
    return logp, row_max, log_sum, entropy


def grad_logits(
    logits: torch.Tensor,
    ids: torch.Tensor,
    g: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out`` may be ``logits`` itself: each chunk is read before it is overwritten."""
    b, seq = ids.shape
    vocab = logits.shape[-1]
    dtype = row_max.dtype
    step = _rows_per_chunk(vocab)
    scale = g.to(dtype) / temperature
    for i in range(b):
        for j in range(0, seq, step):
            k = min(j + step, seq)
            x = logits[i, j:k].to(dtype) / temperature
            p = torch.exp(x - row_max[i, j:k, None] - log_sum[i, j:k, None])
            grad = -p
            idx = ids[i, j:k, None].long()
            in_range = (idx >= 0) & (idx < vocab)
            grad.scatter_add_(-1, idx.clamp(0, vocab - 1), in_range.to(dtype))
            grad = grad * scale[i, j:k, None]
            # g == 0 (masked or clipped tokens) gives an exact 0 even where the logits are -inf.
            grad = torch.where(scale[i, j:k, None] == 0, torch.zeros_like(grad), grad)
            out[i, j:k] = grad.to(out.dtype)
    if out.shape[1] > seq:
        out[:, seq:] = 0
    return out
