"""Selective log-softmax straight from hidden states and ``lm_head.weight``: the [N, V] logits never
exist. The op under ``linear_grpo_loss``, and the answer-only NLL of the SFT stage.

    linear_selective_log_softmax(hidden [N, H] | [B, L, H], weight [V, H], ids [N] | [B, L],
                                 bias [V] | None, temperature, return_entropy)
        -> logp shaped like ids (fp32), and the entropy of softmax(z) (fp32) if asked

z = (hidden @ weight^T + bias) / temperature are the scaled logits. This file holds the whole op:
the Triton kernels and their host loops, the spec path, and the autograd function
``LinearLogSoftmaxFunction`` that dispatches between them (``_dispatch``). Its forward saves only
hidden, weight, ids, bias (references, no copies) and lse [N] (plus E_p[z] [N] when the entropy
is returned); its backward recomputes the logits and returns exact gradients for hidden, weight
and bias, in their own dtypes. A weight shared with the input embedding (tied embeddings) simply
receives this gradient on top of the embedding's. Without autograd nothing is saved.

Triton path (CUDA; bf16 / fp16 / fp32 activations). The vocabulary is walked in chunks
[v0, v0 + VC); within a chunk the grid covers (token block, vocab block) tiles in grouped order,
so that the blocks running at the same time share their hidden and weight tiles through L2 (the
grouped ordering of the Triton matmul tutorial). Each tile is one tl.dot K-loop over H with fp32
accumulation; the K tile is 128 bytes wide whatever the dtype (``prune_to_dtype``).

Forward (``_triton_forward``): a tile's epilogue reduces it to per-row partials -- max m,
sum exp(z - m), sum exp(z - m) * z (for the entropy) -- written to [tiles_n, N] buffers, and the
tile holding a row's target id writes that row's target logit. The host merges the partials with
the logsumexp rule. Rows of a tile that are all -inf (a -inf bias over a token range) give the
partials (-inf, 0, 0), which merge as empty. Nothing [N, V]-sized is written.

Backward (``_triton_backward``): a tile recomputes its logits, forms the logit gradient
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

Spec path (CPU tensors, fp64, ``backend="torch"``): ``reference.linear_logits`` then
``reference.selective_log_softmax`` / ``entropy_from_logits`` on a few whole rows at a time
(``_dispatch.row_chunks``); the backward is autograd through the same spec chunk by chunk, with
the weight and bias gradients accumulated over chunks in the compute dtype.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import Backend, interpreting, row_chunks, use_triton

_INTERPRET = interpreting()
# Read inside the kernels: jit code may only see globals wrapped as constexpr.
_UPCAST_DOT = tl.constexpr(_INTERPRET)

# Width of a K tile in bytes: BLOCK_K = 64 for bf16 / fp16, 32 for fp32. One 128-byte line per
# row of a tile, and the same shared memory per pipeline stage for every dtype: fp32 tiles with
# BLOCK_K = 64 would need up to 320 KB of cp.async buffers, over an A100's 163 KB and an H100's
# 227 KB (tests/test_kernels/test_compile.py measures every config).
K_TILE_BYTES = 128
# (BLOCK_M, BLOCK_N, num_warps, num_stages): Hopper-friendly tiles (two warpgroups on 128x256);
# smaller ones for older cards and for the register-heavier backward epilogue.
_TILE_SHAPES = [(128, 256, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (64, 256, 4, 4),
                (128, 64, 4, 4)]


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        # One small config: the interpreter runs every autotune candidate, and small blocks make
        # the odd test shapes span several tiles in every dimension.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2})]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": K_TILE_BYTES // itemsize, "GROUP_M": 8},
            num_warps=warps,
            num_stages=stages,
        )
        for itemsize in (2, 4)
        for bm, bn, warps, stages in _TILE_SHAPES
    ]


def prune_to_dtype(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """The autotuner's ``early_config_prune``: the configs whose K tile is ``K_TILE_BYTES`` wide
    for the activations' dtype (``h_ptr``)."""
    itemsize = named_args["h_ptr"].element_size()
    kept = [c for c in configs if c.kwargs["BLOCK_K"] * itemsize == K_TILE_BYTES]
    if not kept:
        raise ValueError(f"no linear log-softmax tile for {itemsize}-byte activations")
    return kept


_CONFIGS = _configs()
# Under the interpreter the single config serves every dtype.
_PRUNE = None if _INTERPRET else {"early_config_prune": prune_to_dtype}
# Buffers whose layout depends on the tile shape are sized for the smallest tiles.
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _CONFIGS)
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _CONFIGS)
_HEURISTICS = {"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0}
# Budget of the one vocab-chunk logit-gradient buffer G [N, chunk] of the Triton backward.
_GRAD_CHUNK_BYTES = 1 << 30
# Chunk widths are powers of two times this: chunk edges stay tile-aligned and only a few
# distinct widths (kernel specialisations) occur as N varies between steps.
_CHUNK_ALIGN = 256


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
    prune_configs_by=_PRUNE,
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
    # A row of the tile can be all -inf (padded columns, or -inf logits such as a bias that
    # forbids a token range): shift it by 0, not by -inf, so exp(-inf - -inf) never makes a NaN.
    # Its partials are then max -inf and sums 0, which the host merge reads as empty.
    m_shift = tl.where(m == -float("inf"), 0.0, m)
    e = tl.exp(z - m_shift[:, None])
    part = pid_n.to(tl.int64) * N + rm
    tl.store(pmax_ptr + part, m, mask=row_ok)
    tl.store(psum_ptr + part, tl.sum(e, axis=1), mask=row_ok)
    if WITH_ENTROPY:
        # where() before the product: at -inf logits e = 0 and e * z would be 0 * -inf = NaN.
        tl.store(pdot_ptr + part, tl.sum(e * tl.where(e > 0, z, 0.0), axis=1), mask=row_ok)
    ids = tl.load(ids_ptr + rm, mask=row_ok, other=-1)
    hit = rn[None, :] == ids[:, None]
    target = tl.sum(tl.where(hit, z, 0.0), axis=1)
    mine = (ids >= col0) & (ids < col0 + BLOCK_N) & (ids < v_end)
    tl.store(tgt_ptr + rm, target, mask=row_ok & mine)


@triton.autotune(
    configs=_CONFIGS,
    key=["H"],
    prune_configs_by=_PRUNE,
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
        # -inf logits (padded columns, -inf bias) have p = 0: p * (z - mean) would be 0 * -inf.
        z_finite = tl.where(p > 0, z, 0.0)
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


def _triton_forward(
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
            new_max = torch.maximum(run_max, pmax.amax(dim=0))
            # A row that has seen only -inf logits so far has max -inf and sums 0: rescale it
            # against 0, not -inf, so that exp(-inf - -inf) never makes a NaN.
            shift = new_max.masked_fill(new_max == -float("inf"), 0.0)
            old_scale = torch.exp(run_max - shift)
            scale = torch.exp(pmax - shift)
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


def _triton_backward(
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


def _spec_forward(hidden, weight, ids, bias, temperature, with_entropy):
    """(logp [N], entropy [N] or None) in the compute dtype: the spec, a chunk of rows at a time."""
    n = hidden.shape[0]
    v = weight.shape[0]
    logp = torch.empty(n, dtype=reference.compute_dtype(hidden), device=hidden.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    with torch.autocast(hidden.device.type, enabled=False):
        for rows in row_chunks(n, v):
            z = reference.linear_logits(hidden[rows], weight, bias)
            logp[rows] = reference.selective_log_softmax(z, ids[rows], temperature)
            if entropy is not None:
                entropy[rows] = reference.entropy_from_logits(z, temperature)
    return logp, entropy


def _spec_backward(hidden, weight, ids, bias, temperature, grad_logp, grad_entropy,
                   need_hidden, need_weight, need_bias):
    """Gradients w.r.t. hidden, weight, bias (None where not needed), in their own dtypes: autograd
    through the spec a chunk of rows at a time, weight and bias gradients summed over chunks."""
    n = hidden.shape[0]
    dtype = reference.compute_dtype(hidden)
    need_bias = need_bias and bias is not None
    w = weight.detach().to(dtype).requires_grad_(need_weight)
    b = None if bias is None else bias.detach().to(dtype).requires_grad_(need_bias)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(w) if need_weight else None
    grad_bias = torch.zeros_like(b) if need_bias else None
    for rows in row_chunks(n, weight.shape[0]):
        h = hidden[rows].detach().to(dtype).requires_grad_(need_hidden)
        with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
            z = reference.linear_logits(h, w, b)
            outputs = [reference.selective_log_softmax(z, ids[rows], temperature)]
            upstream = [grad_logp[rows].to(dtype)]
            if grad_entropy is not None:
                outputs.append(reference.entropy_from_logits(z, temperature))
                upstream.append(grad_entropy[rows].to(dtype))
        wanted = [t for t, need in ((h, need_hidden), (w, need_weight), (b, need_bias)) if need]
        grads = list(torch.autograd.grad(outputs, wanted, upstream))
        if need_hidden:
            grad_hidden[rows] = grads.pop(0).to(hidden.dtype)
        if need_weight:
            grad_weight += grads.pop(0)
        if need_bias:
            grad_bias += grads.pop(0)
    return (
        grad_hidden,
        grad_weight.to(weight.dtype) if need_weight else None,
        grad_bias.to(bias.dtype) if need_bias else None,
    )


def _vocab_chunk(n: int, v: int, dtype: torch.dtype, requested: int | None) -> int:
    """Vocabulary columns per Triton pass: as asked, else the widest aligned chunk whose gradient
    buffer G [N, chunk] stays under ``_GRAD_CHUNK_BYTES``."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise ValueError(f"vocab_chunk_size must be a positive int, got {requested!r}")
        return min(requested, v)
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
    reference.check_temperature(temperature)
    if ids.numel() and bool(((ids < 0) | (ids >= weight.shape[0])).any()):
        bad = ids[(ids < 0) | (ids >= weight.shape[0])]
        raise ValueError(
            f"token ids must lie in [0, V = {weight.shape[0]}); got {bad.numel()} outside, "
            f"e.g. {bad[0].item()}"
        )


def _forward(hidden, weight, ids, bias, temperature, with_entropy, triton_path, vocab_chunk):
    """(logp, entropy or None, lse or None, E_p[z] or None): the Triton path saves its logsumexp
    (and mean logit) for the backward; the spec path recomputes everything."""
    if triton_path:
        logp, lse, entropy, mean = _triton_forward(
            hidden, weight, ids, bias, temperature, with_entropy, vocab_chunk
        )
        return logp, entropy, lse, mean
    logp, entropy = _spec_forward(hidden, weight, ids, bias, temperature, with_entropy)
    return logp, entropy, None, None


class LinearLogSoftmaxFunction(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], ids [N] int64, bias [V] | None, temperature,
    return_entropy, triton_path, vocab_chunk) -> logp [N]`` (and ``entropy [N]``), both
    differentiable; see the module docstring for what is saved."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, bias, temperature, return_entropy, triton_path,
                vocab_chunk):
        logp, entropy, lse, mean = _forward(
            hidden, weight, ids, bias, temperature, return_entropy, triton_path, vocab_chunk
        )
        ctx.save_for_backward(hidden, weight, ids, bias, lse, mean)
        ctx.triton_path = triton_path
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
            grad_logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        need = ctx.needs_input_grad
        if ctx.triton_path:
            grads = _triton_backward(
                hidden, weight, ids, bias, ctx.temperature, lse,
                grad_logp.float().contiguous(),
                None if grad_entropy is None else grad_entropy.float().contiguous(),
                mean, ctx.vocab_chunk, need[0], need[1], need[3],
            )
        else:
            grads = _spec_backward(
                hidden, weight, ids, bias, ctx.temperature, grad_logp, grad_entropy,
                need[0], need[1], need[3],
            )
        grad_hidden, grad_weight, grad_bias = grads
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
    in ``[0, V)``, bias ``[V]``. Returns fp32 log-probs shaped like ``ids`` (the compute dtype
    on the spec path: fp64 stays fp64), and with ``return_entropy`` also the entropy of each
    row's softmax (differentiable too). ``vocab_chunk_size`` bounds the vocabulary columns of one
    Triton pass (default: sized so its gradient buffer stays under 1 GiB; the spec path takes
    whole rows, ``_dispatch.CHUNK_ELEMENTS`` elements at a time). ``backend``: ``_dispatch``.
    """
    _check_inputs(hidden, weight, ids, bias, temperature)
    h2d = hidden.reshape(-1, hidden.shape[-1])
    # No tokens: nothing to launch (a zero-size grid); the spec path returns the empties.
    triton_path = use_triton(backend, hidden, _forward_chunk_kernel) and h2d.shape[0] > 0
    flat_ids = ids.reshape(-1).to(torch.int64).contiguous()
    chunk = _vocab_chunk(h2d.shape[0], weight.shape[0], hidden.dtype, vocab_chunk_size)
    temperature = float(temperature)
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if wants_grad:
        out = LinearLogSoftmaxFunction.apply(
            h2d, weight, flat_ids, bias, temperature, return_entropy, triton_path, chunk
        )
    else:
        logp, entropy, _, _ = _forward(
            h2d, weight, flat_ids, bias, temperature, return_entropy, triton_path, chunk
        )
        out = (logp, entropy) if return_entropy else logp
    if return_entropy:
        return out[0].view(ids.shape), out[1].view(ids.shape)
    return out.view(ids.shape)
