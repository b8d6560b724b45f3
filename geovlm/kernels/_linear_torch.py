"""Chunked pure-torch linear log-softmax: the CPU path of `linear_grpo_loss.py`, fp32 math.

Same contract as `_linear_triton.forward` / `backward` (hidden [N, H], weight [V, H],
bias [V] or None, ids [N] int64; per-token results fp32 [N]). Work is tiled into
[token_chunk, vocab_chunk] blocks so the largest temporary is one fp32 logit block, whatever N
and V are: the forward keeps an online logsumexp per token, the backward recomputes each block
and accumulates grad_hidden over vocab chunks and grad_weight / grad_bias over token chunks in
fp32.
"""

from __future__ import annotations

import torch

# Rows per block: with the vocab chunk this bounds each fp32 logit block.
TOKEN_CHUNK = 1024


def _logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inv_temp: float,
) -> torch.Tensor:
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z += bias.float()
    return z.mul_(inv_temp)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    with_entropy: bool,
    vocab_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logp [N], lse [N], entropy [N] or None, mean scaled logit E_p[z] [N] or None), fp32."""
    n = hidden.shape[0]
    v = weight.shape[0]
    inv_temp = 1.0 / temperature
    f32 = dict(device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n, **f32)
    target = torch.empty(n, **f32)
    mean = torch.empty(n, **f32) if with_entropy else None
    for t0 in range(0, n, TOKEN_CHUNK):
        rows = slice(t0, min(t0 + TOKEN_CHUNK, n))
        h = hidden[rows]
        tok = ids[rows]
        run_max = torch.full((h.shape[0],), float("-inf"), **f32)
        run_sum = torch.zeros(h.shape[0], **f32)
        run_dot = torch.zeros(h.shape[0], **f32)
        for v0 in range(0, v, vocab_chunk):
            v1 = min(v0 + vocab_chunk, v)
            z = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], inv_temp)
            new_max = torch.maximum(run_max, z.amax(dim=1))
            old_scale = torch.exp(run_max - new_max)
            e = torch.exp(z - new_max[:, None])
            run_sum = run_sum * old_scale + e.sum(dim=1)
            if with_entropy:
                run_dot = run_dot * old_scale + (e * z).sum(dim=1)
            run_max = new_max
            inside = (tok >= v0) & (tok < v1)
            local = (tok - v0).clamp(0, v1 - v0 - 1)
            picked = z.gather(1, local[:, None]).squeeze(1)
            target[rows] = torch.where(inside, picked, target[rows])
        lse[rows] = run_max + torch.log(run_sum)
        if with_entropy:
            mean[rows] = run_dot / run_sum
    logp = target - lse
    if not with_entropy:
        return logp, lse, None, None
    return logp, lse, lse - mean, mean


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    mean_logit: torch.Tensor | None,
    vocab_chunk: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. hidden, weight, bias (None where not needed), in their own dtypes."""
    n, h_dim = hidden.shape
    v = weight.shape[0]
    inv_temp = 1.0 / temperature
    need_bias = need_bias and bias is not None
    f32 = dict(device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.zeros(n, h_dim, **f32) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty_like(bias) if need_bias else None
    for v0 in range(0, v, vocab_chunk):
        v1 = min(v0 + vocab_chunk, v)
        w = weight[v0:v1].float()
        gw = torch.zeros(v1 - v0, h_dim, **f32) if need_weight else None
        gb = torch.zeros(v1 - v0, **f32) if need_bias else None
        for t0 in range(0, n, TOKEN_CHUNK):
            rows = slice(t0, min(t0 + TOKEN_CHUNK, n))
            h = hidden[rows].float()
            z = _logits(h, w, None if bias is None else bias[v0:v1], inv_temp)
            p = torch.exp(z - lse[rows, None])
            g_logp = grad_logp[rows]
            grad = -g_logp[:, None] * p
            if grad_entropy is not None:
                grad -= grad_entropy[rows, None] * p * (z - mean_logit[rows, None])
            tok = ids[rows]
            inside = (tok >= v0) & (tok < v1)
            local = (tok - v0).clamp(0, v1 - v0 - 1)
            grad.scatter_add_(1, local[:, None], (g_logp * inside)[:, None])
            grad.mul_(inv_temp)
            if need_hidden:
                grad_hidden[rows] += grad @ w
            if need_weight:
                gw += grad.t() @ h
            if need_bias:
                gb += grad.sum(dim=0)
        if need_weight:
            grad_weight[v0:v1] = gw
        if need_bias:
            grad_bias[v0:v1] = gb
    return (
        grad_hidden.to(hidden.dtype) if need_hidden else None,
        grad_weight,
        grad_bias,
    )
