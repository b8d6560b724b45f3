"""No-grad selective log-softmax (+ entropy) against float64 torch, TRL's and Liger's versions, on
both backends, at odd shapes, low-precision inputs and extreme logits."""

from __future__ import annotations

import pytest
import torch

from geovlm.kernels import _dispatch
from geovlm.kernels import reference as ref
from geovlm.kernels.logprobs import selective_log_softmax

from .conftest import needs_cuda, needs_interpreter

B, L, V = 3, 17, 1031
BACKENDS = [pytest.param("triton", marks=needs_interpreter), "torch"]


def _logits(seed, shape=(B, L + 1, V), dtype=torch.float32, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g) * scale).to(dtype)
    ids = torch.randint(0, shape[-1], (shape[0], L), generator=g)
    return logits, ids, g


def _want(logits, ids, temperature=1.0):
    """float64 oracle on the exact input values (bf16/fp16 values are exact in float64)."""
    x = logits[:, : ids.shape[1]].double()
    return ref.selective_log_softmax(x, ids, temperature), ref.entropy_from_logits(x, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-6),
                                       (torch.float16, 2e-6)])
@pytest.mark.parametrize("extra_position", [True, False])
def test_matches_float64(backend, dtype, tol, extra_position):
    shape = (B, L + int(extra_position), V)
    logits, ids, g = _logits(int(extra_position) * 7 + len(str(dtype)), shape, dtype)
    temperature = 0.8 if extra_position else 1.0
    logp, ent = selective_log_softmax(logits, ids, temperature, return_entropy=True,
                                      backend=backend)
    want_logp, want_ent = _want(logits, ids, temperature)
    assert logp.dtype == torch.float32 and logp.shape == (B, L)
    torch.testing.assert_close(logp.double(), want_logp, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(ent.double(), want_ent, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_skips_rows_and_their_ids(backend):
    """Masked rows give 0 and are not read: NaN logits and ignore-index ids (-100) there are
    fine. An id outside the vocabulary at an unmasked row gives NaN, not an out-of-bounds read."""
    logits, ids, g = _logits(3)
    mask = torch.rand(B, L, generator=g) < 0.7
    want_logp, want_ent = _want(logits, ids)
    logits[:, :L][~mask] = float("nan")
    ids[~mask] = -100
    logp, ent = selective_log_softmax(logits, ids, 1.0, True, mask=mask, backend=backend)
    torch.testing.assert_close(logp.double(), want_logp * mask, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent * mask, rtol=2e-6, atol=2e-5)
    b0, t0 = mask.nonzero()[0].tolist()
    ids[b0, t0] = V
    logp = selective_log_softmax(logits, ids, 1.0, mask=mask.long(), backend=backend)
    assert torch.isnan(logp[b0, t0])
    assert torch.isfinite(logp[mask]).sum() == mask.sum() - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """Rows far below 0, far above 0, -inf entries, a whole -inf vocab block before the first
    finite one, a -inf target, and a one-entry vocabulary."""
    block = _dispatch.INTERPRETER_BLOCK_V
    logits, ids, g = _logits(5, (B, L, block + 301), scale=30.0)
    logits[0] -= 1e4
    logits[1] += 1e4
    logits[2, :, :block] = -float("inf")
    logits[2, :, block::5] = -float("inf")
    ids[2] = torch.randint(block + 1, block + 301, (L,), generator=g)
    ids[2, 0] = block  # a -inf target: log-prob -inf, not NaN
    logp, ent = selective_log_softmax(logits, ids, 1.0, True, backend=backend)
    want_logp, want_ent = _want(logits, ids)
    assert logp[2, 0] == -float("inf")
    finite = torch.isfinite(want_logp)
    assert torch.isfinite(logp[finite]).all() and torch.isfinite(ent).all()
    # Differences of fp32 values near 1e4 are exact, so precision is not lost far from 0.
    torch.testing.assert_close(logp.double()[finite], want_logp[finite], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-4)
    one = torch.randn(2, L, 1)
    out = selective_log_softmax(one, torch.zeros(2, L, dtype=torch.long), backend=backend)
    assert (out == 0).all()


# The interpreter runs the kernels in numpy, which warns about the log(0) of such a row.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_a_finite_logit(backend):
    """A row of -inf logits has no distribution: NaN log-prob and entropy as in float64 when it
    is scored, 0 (never read) when the mask leaves it out."""
    logits, ids, _ = _logits(12)
    logits[1, 4] = -float("inf")
    want_logp, _ = _want(logits, ids)
    assert torch.isnan(want_logp[1, 4])
    logp, ent = selective_log_softmax(logits, ids, 1.0, True, backend=backend)
    assert torch.isnan(logp[1, 4]) and torch.isnan(ent[1, 4])
    assert torch.isfinite(logp).sum() == logp.numel() - 1
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4] = False
    logp, ent = selective_log_softmax(logits, ids, 1.0, True, mask=mask, backend=backend)
    assert logp[1, 4] == 0 and ent[1, 4] == 0 and torch.isfinite(logp).all()
    torch.testing.assert_close(logp.double()[mask], want_logp[mask], rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_trl(backend):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits, ids, _ = _logits(9)
    ours = selective_log_softmax(logits[:, :L], ids, 0.9, backend=backend)
    theirs = trl_utils.selective_log_softmax(logits[:, :L].double(), ids, 0.9)
    torch.testing.assert_close(ours.double(), theirs, rtol=2e-6, atol=2e-5)


@needs_interpreter
def test_matches_liger():
    liger = pytest.importorskip("liger_kernel.ops.grpo_loss")
    logits, ids, g = _logits(10)
    mask = (torch.rand(B, L, generator=g) < 0.8).long()
    ours = selective_log_softmax(logits, ids, 0.9, mask=mask, backend="triton")
    theirs = liger.fused_selective_log_softmax(logits, ids, 0.9, mask)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-5)


def test_errors_name_the_problem():
    logits, ids, _ = _logits(1)
    with pytest.raises(ValueError, match="L \\+ 1"):
        selective_log_softmax(logits[:, :4], ids)
    with pytest.raises(ValueError, match="mask"):
        selective_log_softmax(logits, ids, mask=ids[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(logits, ids, -1.0)
    with pytest.raises(ValueError, match="ids is on meta"):
        selective_log_softmax(logits, ids.to("meta"))
    with pytest.raises(ValueError, match="floating"):
        selective_log_softmax(ids[..., None].expand(B, L, 5), ids)
    with pytest.raises(ValueError, match="backend must be"):
        selective_log_softmax(logits, ids, backend="numba")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _dispatch.use_triton("triton", logits, kernel=object())
    assert not _dispatch.use_triton("auto", logits, kernel=object())


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_float64(dtype):
    """The compiled kernel on a GPU at Qwen2.5-VL's vocabulary (151,936: 38 blocks, a tail)."""
    logits, ids, _ = _logits(11, (2, L + 1, 151_936), dtype, scale=6.0)
    logits, ids = logits.cuda(), ids.cuda()
    logp, ent = selective_log_softmax(logits, ids, 0.9, return_entropy=True)
    want_logp, want_ent = _want(logits, ids, 0.9)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-4)
