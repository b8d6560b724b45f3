"""Triton kernels of the fused linear log-softmax: hidden x weight^T without the [N, V] logits.

Shapes: hidden [N, H] (any strides), weight [V, H], bias [V] or None, ids [N] int64 in [0, V).
Every per-token result is fp32 [N]. z = (hidden @ weight^T + bias) / T are the scaled logits.

The vocabulary is walked in chunks [v0, v0 + VC); within a chunk the grid covers
(token block, vocab block) tiles in grouped order, so that the blocks running at the same time
share their hidden and weight tiles through L2 (the grouped ordering of the Triton matmul
tutorial). Each tile is one tl.dot K-loop over H with fp32 accumulation.

Forward (`forward`): a tile's epilogue reduces it to per-row partials -- max m, sum exp(z - m),
sum exp(z - m) * z (for the entropy) -- written to [tiles_n, N] buffers, and the tile holding
a row's target id writes that row's target logit. The host merges the partials with the
logsumexp rule. Nothing [N, V]-sized is written; for backward only lse [N] (and the mean
logit E_p[z] when the entropy needs a gradient) is kept.

Backward (`backward`): a tile recomputes its logits, forms the logit gradient
dL/dz_raw = (g_logp * (onehot - p) - g_ent * p * (z - E_p[z])) / T in registers and stores it
for the chunk, G [N, VC] in the compute dtype, plus per-token-block fp32 column sums for the
bias gradient. Then two cuBLAS GEMMs consume G with fp32 accumulation:
grad_weight[chunk] = G^T @ hidden (the whole N contraction in one GEMM, written once) and
grad_hidden += G @ weight[chunk] (an fp32 [N, H] accumulator across chunks).

Why G per vocab chunk rather than atomics from the tile: a tile holds only a [BM, BN] slice of
G while both gradients need all H columns, so atomics would add (V / BN) partial [N, H] products
into grad_hidden and (N / BM) partial [V, H] products into grad_weight -- tens of GB of atomic
traffic at Qwen2.5-VL sizes, more than the matmuls themselves. A second pass over the other
dimension inside one kernel cannot hold a [BM, H] or [BN, H] accumulator in registers for
H = 2048-3584, so it would recompute each tile H / BK times. Storing G for one vocab chunk
(bounded by a memory budget) and handing it to cuBLAS costs one write and two reads of G,
keeps every accumulation in fp32 and makes the weight gradient exact and deterministic.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Read inside the kernels: jit code may only see globals wrapped as constexpr.
_UPCAST_DOT = tl.constexpr(_INTERPRET)


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        # One small config: the interpreter runs every autotune candidate, and small blocks make
        # the odd test shapes span several tiles in every dimension.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2})]
    # Hopper-friendly bf16 tiles (two warpgroups on 128x256); smaller ones for older cards and
    # for the register-heavier backward epilogue.
    shapes = [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=warps,
            num_stages=stages,
        )
        for bm, bn, bk, warps, stages in shapes
    ]


_CONFIGS = _configs()
# Buffers whose layout depends on the tile shape are sized for the smallest tiles.
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _CONFIGS)
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _CONFIGS)
_HEURISTICS = {"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0}


@triton.jit
def _tile_pids(N, VC, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(VC, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _scaled_logits(
    h_ptr, w_ptr, b_ptr, rm, rn, N, v_end, H,
    stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32 tile of z; columns at or past v_end are -inf."""
    row_ok = rm < N
    col_ok = rn < v_end
    rk = tl.arange(0, BLOCK_K)
    # int64 offsets: N * H and V * H exceed 2**31 at 16k tokens x 152k vocab.
    h_ptrs = h_ptr + rm[:, None].to(tl.int64) * stride_hn + rk[None, :] * stride_hk
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wv + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            h = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_left = H - k * BLOCK_K
            h = tl.load(h_ptrs, mask=row_ok[:, None] & (rk[None, :] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :] & (rk[:, None] < k_left), other=0.0)
        if UPCAST_DOT:
            # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits; bf16 x bf16
            # products are exact in fp32, so upcasting gives the GPU's fp32-accumulated result.
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))


@triton.autotune(
    configs=_CONFIGS,
    key=["H"],
    # Partial buffers are laid out by BLOCK_N: a candidate with smaller tiles would leave rows
    # that the chosen one does not overwrite.
    restore_value=["pmax_ptr", "psum_ptr", "pdot_ptr"],
)
@triton.heuristics(_HEURISTICS)
@triton.jit
def _forward_chunk_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, pmax_ptr, psum_ptr, pdot_ptr, tgt_ptr,
    N, H, v0, VC,
    stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile_pids(N, VC, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = v0 + pid_n * BLOCK_N
    rn = col0 + tl.arange(0, BLOCK_N)
    v_end = v0 + VC
    z = _scaled_logits(
        h_ptr, w_ptr, b_ptr, rm, rn, N, v_end, H,
        stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
        HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, _UPCAST_DOT,
    )
    row_ok = rm < N
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    part = pid_n.to(tl.int64) * N + rm
    tl.store(pmax_ptr + part, m, mask=row_ok)
    tl.store(psum_ptr + part, tl.sum(e, axis=1), mask=row_ok)
    if WITH_ENTROPY:
        # Padded columns have e = 0 and z = -inf, whose product would be nan.
        z_finite = tl.where(rn[None, :] < v_end, z, 0.0)
        tl.store(pdot_ptr + part, tl.sum(e * z_finite, axis=1), mask=row_ok)
    ids = tl.load(ids_ptr + rm, mask=row_ok, other=-1)
    hit = rn[None, :] == ids[:, None]
    target = tl.sum(tl.where(hit, z, 0.0), axis=1)
    mine = (ids >= col0) & (ids < col0 + BLOCK_N) & (ids < v_end)
    tl.store(tgt_ptr + rm, target, mask=row_ok & mine)


@triton.autotune(
    configs=_CONFIGS,
    key=["H"],
    # Bias partials are laid out by BLOCK_M (see the forward kernel).
    restore_value=["gbias_ptr"],
)
@triton.heuristics(_HEURISTICS)
@triton.jit
def _grad_logits_chunk_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, lse_ptr, glogp_ptr, gent_ptr, mean_ptr, g_ptr, gbias_ptr,
    N, H, v0, VC,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_gn, stride_gb, inv_temp,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile_pids(N, VC, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = v0 + local
    v_end = v0 + VC
    z = _scaled_logits(
        h_ptr, w_ptr, b_ptr, rm, rn, N, v_end, H,
        stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
        HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, _UPCAST_DOT,
    )
    row_ok = rm < N
    live = row_ok[:, None] & (rn[None, :] < v_end)
    # +inf on padded rows makes p exactly 0 there (no overflow from a bias-only row).
    lse = tl.load(lse_ptr + rm, mask=row_ok, other=float("inf"))
    g_logp = tl.load(glogp_ptr + rm, mask=row_ok, other=0.0)
    ids = tl.load(ids_ptr + rm, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    grad = tl.where(rn[None, :] == ids[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if ENTROPY_GRAD:
        g_ent = tl.load(gent_ptr + rm, mask=row_ok, other=0.0)
        mean = tl.load(mean_ptr + rm, mask=row_ok, other=0.0)
        # Padded columns have p = 0 and z = -inf, whose product would be nan.
        z_finite = tl.where(live, z, 0.0)
        grad -= g_ent[:, None] * p * (z_finite - mean[:, None])
    # Padded rows and columns (p may be inf or nan there) contribute nothing.
    grad = tl.where(live, grad * inv_temp, 0.0)
    g_ptrs = g_ptr + rm[:, None].to(tl.int64) * stride_gn + local[None, :]
    tl.store(g_ptrs, grad.to(g_ptr.dtype.element_ty), mask=live)
    if BIAS_GRAD:
        tl.store(gbias_ptr + pid_m.to(tl.int64) * stride_gb + local, tl.sum(grad, axis=0),
                 mask=rn < v_end)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 activations follow torch's matmul setting, so the kernel is as exact as `x @ w.T`.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _compute_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in the activations' dtype (tl.dot takes one dtype).

    A wider weight (fp32 master lm_head with bf16 hidden states) is rounded once on the host,
    as autocast would round it for `F.linear`, rather than per tile in the kernels.
    """
    return weight if weight.dtype == dtype else weight.to(dtype)


def _grid(n: int, vc: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(vc, meta["BLOCK_N"]),)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (cuBLAS bf16/fp16 -> fp32 GEMM on CUDA)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


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
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    weight = _compute_weight(weight, hidden.dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    run_max = torch.full((n,), float("-inf"), **f32)
    run_sum = torch.zeros(n, **f32)
    run_dot = torch.zeros(n, **f32) if with_entropy else None
    target = torch.zeros(n, **f32)
    tiles = triton.cdiv(min(vocab_chunk, v), _MIN_BLOCK_N)
    pmax = torch.empty(tiles, n, **f32)
    psum = torch.empty(tiles, n, **f32)
    pdot = torch.empty(tiles, n, **f32) if with_entropy else psum
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        for v0 in range(0, v, vocab_chunk):
            vc = min(vocab_chunk, v - v0)
            # Tiles the chosen config does not reach must merge as empty.
            pmax.fill_(float("-inf"))
            psum.zero_()
            if with_entropy:
                pdot.zero_()
            _forward_chunk_kernel[_grid(n, vc)](
                hidden, weight, bias if bias is not None else hidden, ids,
                pmax, psum, pdot, target,
                n, h, v0, vc,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                1.0 / temperature,
                HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
                DOT_PRECISION=_dot_precision(hidden.dtype),
            )
            chunk_max = pmax.amax(dim=0)
            new_max = torch.maximum(run_max, chunk_max)
            old_scale = torch.exp(run_max - new_max)
            scale = torch.exp(pmax - new_max)
            run_sum = run_sum * old_scale + (psum * scale).sum(dim=0)
            if with_entropy:
                run_dot = run_dot * old_scale + (pdot * scale).sum(dim=0)
            run_max = new_max
    lse = run_max + torch.log(run_sum)
    logp = target - lse
    if not with_entropy:
        return logp, lse, None, None
    mean = run_dot / run_sum
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
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    cdtype = hidden.dtype
    need_bias = need_bias and bias is not None
    grad_hidden = torch.zeros(n, h, device=dev, dtype=torch.float32) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty_like(bias) if need_bias else None
    weight = _compute_weight(weight, cdtype)
    width = min(vocab_chunk, v)
    g = torch.empty(n, width, device=dev, dtype=cdtype)
    gbias = torch.empty(triton.cdiv(n, _MIN_BLOCK_M) if need_bias else 1, width,
                        device=dev, dtype=torch.float32)
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        for v0 in range(0, v, vocab_chunk):
            vc = min(vocab_chunk, v - v0)
            gc = g[:, :vc]
            if need_bias:
                gbias.zero_()
            _grad_logits_chunk_kernel[_grid(n, vc)](
                hidden, weight, bias if bias is not None else hidden, ids, lse, grad_logp,
                grad_entropy if grad_entropy is not None else lse,
                mean_logit if mean_logit is not None else lse,
                gc, gbias,
                n, h, v0, vc,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                gc.stride(0), gbias.stride(0), 1.0 / temperature,
                HAS_BIAS=bias is not None, BIAS_GRAD=need_bias,
                ENTROPY_GRAD=grad_entropy is not None,
                DOT_PRECISION=_dot_precision(cdtype),
            )
            w_chunk = weight[v0 : v0 + vc]
            if need_hidden:
                grad_hidden += _mm_fp32(gc, w_chunk)
            if need_weight:
                grad_weight[v0 : v0 + vc] = _mm_fp32(gc.t(), hidden)
            if need_bias:
                grad_bias[v0 : v0 + vc] = gbias[:, :vc].sum(dim=0)
    return (
        grad_hidden.to(hidden.dtype) if need_hidden else None,
        grad_weight,
        grad_bias,
    )
