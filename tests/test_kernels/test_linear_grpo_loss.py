"""Fused linear GRPO loss against its oracles.

Oracles: float64 torch on materialised logits (``F.log_softmax`` of ``hidden @ weight.T + bias``)
composed with the float64 reference GRPO math, and Liger-Kernel's chunked
``LigerFusedLinearGRPOLoss`` where the options overlap. The Triton path runs on CPU through
Triton's interpreter at odd shapes that are not multiples of the (16, 32, 16) interpreter tiles;
the chunked torch path runs everywhere.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from geovlm.kernels import _dispatch
from geovlm.kernels import reference as ref
from geovlm.kernels.linear_grpo_loss import linear_grpo_loss, linear_selective_log_softmax
from geovlm.kernels.options import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES

from .conftest import INTERPRETED, needs_cuda, needs_interpreter

TRITON = pytest.param("triton", marks=needs_interpreter)
BACKENDS = [TRITON, "torch"]


def _gen(key: str) -> torch.Generator:
    """A generator seeded per test case: fresh inputs for every case, reproducible on failure."""
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str, atol: float = 1e-12
) -> None:
    """Max abs error relative to the oracle's largest magnitude (gradients span many scales)."""
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def _leaf(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _oracle_logits(h, w, b):
    z = h.reshape(-1, h.shape[-1]) @ w.t()
    return z if b is None else z + b


# ---------------------------------------------------------------- log-probs and entropy


LOGP_CASES = {
    # name: (hidden shape, V, bias, temperature, vocab_chunk_size, hidden scale)
    "odd_2d_chunked": ((37, 48), 203, True, 0.7, 64, 1.0),
    "3d_h_not_multiple_of_block_k": ((3, 11, 50), 97, False, 1.0, None, 1.0),
    "huge_logits": ((19, 32), 203, True, 1.3, 100, 40.0),
    "single_token": ((1, 16), 33, True, 2.0, None, 1.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LOGP_CASES))
def test_logp_and_entropy_match_float64(backend, case):
    shape, v, with_bias, temp, chunk, scale = LOGP_CASES[case]
    g = _gen(case + backend)
    h_dim = shape[-1]
    hidden = torch.randn(*shape, generator=g) * scale
    weight = torch.randn(v, h_dim, generator=g) / h_dim**0.5
    bias = torch.randn(v, generator=g) if with_bias else None
    ids = torch.randint(0, v, shape[:-1], generator=g)
    # The first and last vocabulary entries sit at tile and chunk edges.
    ids.view(-1)[0] = 0
    ids.view(-1)[-1] = v - 1
    up_logp = torch.randn(shape[:-1], generator=g)
    up_ent = torch.randn(shape[:-1], generator=g)

    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    logp, ent = linear_selective_log_softmax(
        h, w, ids, b, temp, return_entropy=True, vocab_chunk_size=chunk, backend=backend
    )
    ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()

    hd, wd, bd = _leaf(hidden, torch.float64), _leaf(weight, torch.float64), _leaf(
        bias, torch.float64
    )
    z = _oracle_logits(hd, wd, bd) / temp
    lsm = F.log_softmax(z, dim=-1)
    logp_ref = lsm.gather(1, ids.reshape(-1, 1)).view(ids.shape)
    ent_ref = -(lsm.exp() * lsm).sum(-1).view(ids.shape)
    ((logp_ref * up_logp).sum() + (ent_ref * up_ent).sum()).backward()

    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    _assert_close(logp, logp_ref, 2e-6, "logp")
    _assert_close(ent, ent_ref, 2e-5, "entropy")
    _assert_close(h.grad, hd.grad, 2e-5, "grad hidden")
    _assert_close(w.grad, wd.grad, 2e-5, "grad weight")
    if with_bias:
        _assert_close(b.grad, bd.grad, 2e-5, "grad bias")

    # The no-grad variant (old / reference policies) gives the same numbers and keeps no graph.
    with torch.no_grad():
        logp_ng, ent_ng = linear_selective_log_softmax(
            h, w, ids, b, temp, return_entropy=True, vocab_chunk_size=chunk, backend=backend
        )
    assert logp_ng.grad_fn is None and ent_ng.grad_fn is None
    _assert_close(logp_ng, logp_ref, 2e-6, "no-grad logp")
    _assert_close(ent_ng, ent_ref, 2e-5, "no-grad entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_entropy_or_only_logp_receives_gradient(backend):
    """Outputs that do not reach the loss get no gradient term (None, not a stale zero path)."""
    g = _gen("entropy-only" + backend)
    hidden = torch.randn(21, 24, generator=g)
    weight = torch.randn(77, 24, generator=g) / 5
    ids = torch.randint(0, 77, (21,), generator=g)
    for use in ("logp", "entropy"):
        h, w = _leaf(hidden), _leaf(weight)
        logp, ent = linear_selective_log_softmax(
            h, w, ids, None, 0.9, return_entropy=True, backend=backend
        )
        (logp if use == "logp" else ent).sum().backward()
        hd, wd = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
        lsm = F.log_softmax(_oracle_logits(hd, wd, None) / 0.9, dim=-1)
        out = lsm.gather(1, ids[:, None]) if use == "logp" else -(lsm.exp() * lsm).sum(-1)
        out.sum().backward()
        _assert_close(h.grad, hd.grad, 2e-5, f"grad hidden ({use})")
        _assert_close(w.grad, wd.grad, 2e-5, f"grad weight ({use})")


# ---------------------------------------------------------------- GRPO loss, every option

B, L, H, V = 4, 11, 40, 150


def _grpo_inputs(key: str, dtype=torch.float32):
    g = _gen(key)
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5 * 2
    bias = torch.randn(V, generator=g) * 0.5
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) < 0.8).to(torch.int64)
    mask[0] = 0  # a fully masked completion
    mask[1, 4:] = 0
    mask[2] = 1
    # Padding ids may be anything (here Hugging Face's ignore index): they must never be read.
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    with torch.no_grad():
        z = _oracle_logits(hidden.double(), weight.double(), bias.double())
        lp = F.log_softmax(z, -1).gather(1, ids.clamp(min=0).view(-1, 1)).view(B, L).float()
    # Ratios on both sides of the clip range; a zero advantage.
    old = lp + torch.randn(B, L, generator=g) * 0.3
    refp = lp + torch.randn(B, L, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    adv[3] = 0.0
    vllm = torch.rand(B, L, generator=g) * 0.5 + 0.75
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype), ids=ids,
                mask=mask, old=old, ref=refp, adv=adv, vllm=vllm)


def _loss_pair(x, backend, options, *, old=True, vllm=False, chunk=None, oracle_x=None):
    """(ours, oracle) as (loss, metrics, grad hidden, grad weight, grad bias) for the inputs x
    (the oracle may see other inputs, e.g. the weight rounded the way the kernel computes)."""
    common = dict(options)
    temp = common.pop("temperature", 0.8)
    if vllm:
        common["vllm_is_ratio"] = x["vllm"]
    h, w, b = _leaf(x["hidden"]), _leaf(x["weight"]), _leaf(x["bias"])
    loss, metrics = linear_grpo_loss(
        h, w, x["ids"], x["adv"], old_logp=x["old"] if old else None, ref_logp=x["ref"],
        completion_mask=x["mask"], bias=b, temperature=temp, vocab_chunk_size=chunk,
        backend=backend, **common,
    )
    loss.backward()
    ours = (loss, metrics, h.grad, w.grad, b.grad)

    hd, wd, bd = (_leaf((oracle_x or x)[k], torch.float64) for k in ("hidden", "weight", "bias"))
    z = _oracle_logits(hd, wd, bd) / temp
    lp = F.log_softmax(z, -1).gather(1, x["ids"].clamp(min=0).view(-1, 1)).view(B, L)
    d = lambda t: t.double()
    if vllm:
        common["vllm_is_ratio"] = d(x["vllm"])
    loss_ref, metrics_ref = ref.grpo_loss_from_logps(
        lp, d(x["old"]) if old else None, d(x["ref"]), d(x["adv"]), x["mask"], **common
    )
    loss_ref.backward()
    return ours, (loss_ref, metrics_ref, hd.grad, wd.grad, bd.grad)


def _check_pair(ours, oracle, rtol_loss=1e-5, rtol_grad=2e-5):
    loss, metrics, *grads = ours
    loss_ref, metrics_ref, *grads_ref = oracle
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # A loss near 0 can be a difference of O(1) terms: fp32 rounding of those is the floor.
    _assert_close(loss, loss_ref, rtol_loss, "loss", atol=1e-7)
    assert set(metrics) == set(metrics_ref)
    for name in metrics:
        _assert_close(metrics[name], metrics_ref[name], 1e-4, f"metric {name}")
    for name, gr, gr_ref in zip(("hidden", "weight", "bias"), grads, grads_ref, strict=True):
        _assert_close(gr, gr_ref, rtol_grad, f"grad {name}")


def _beta(loss_type: str, level: str) -> float:
    """Alternates the KL term so every loss type and every level runs with and without it."""
    parity = LOSS_TYPES.index(loss_type) + IMPORTANCE_SAMPLING_LEVELS.index(level)
    return 0.05 if parity % 2 else 0.0


GRPO_CASES = [
    pytest.param(lt, level, _beta(lt, level), id=f"{lt}-{level}-beta{_beta(lt, level)}")
    for lt in LOSS_TYPES
    for level in IMPORTANCE_SAMPLING_LEVELS
]


@needs_interpreter
@pytest.mark.parametrize("loss_type, level, beta", GRPO_CASES)
def test_grpo_loss_matches_float64_reference(loss_type, level, beta):
    x = _grpo_inputs(f"{loss_type}{level}{beta}")
    options = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                   eps_low=0.2, eps_high=5.0 if loss_type == "cispo" else 0.28,
                   max_completion_length=L + 3)
    _check_pair(*_loss_pair(x, "triton", options, chunk=64))


EXTRA_OPTIONS = {
    "on_policy_no_old": (dict(loss_type="dapo", beta=0.04), dict(old=False)),
    "delta_two_sided_clip": (dict(loss_type="grpo", beta=0.0, delta=1.1), {}),
    "bias_corrected_kl": (dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=True), {}),
    "bias_corrected_kl_seq": (dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True,
                                   importance_sampling_level="sequence"), {}),
    "vllm_is_ratio": (dict(loss_type="dapo", beta=0.04), dict(vllm=True)),
    "vllm_is_ratio_vespo": (dict(loss_type="vespo", beta=0.0), dict(vllm=True)),
    "num_items_in_batch": (dict(loss_type="dapo", beta=0.0, num_items_in_batch=97), {}),
    "dr_grpo_default_length": (dict(loss_type="dr_grpo", beta=0.0), {}),
    "sapo_temperatures": (dict(loss_type="sapo", beta=0.0, sapo_temperature_pos=0.5,
                               sapo_temperature_neg=2.0), {}),
    "temperature_one": (dict(loss_type="grpo", beta=0.04, temperature=1.0), {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EXTRA_OPTIONS))
def test_grpo_options_match_float64_reference(backend, name):
    options, kwargs = EXTRA_OPTIONS[name]
    x = _grpo_inputs(name + backend)
    _check_pair(*_loss_pair(x, backend, dict(options), **kwargs))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
def test_torch_path_matches_float64_reference(loss_type):
    x = _grpo_inputs("torch" + loss_type)
    options = dict(loss_type=loss_type, beta=0.05)
    _check_pair(*_loss_pair(x, "torch", options, chunk=37))


# ---------------------------------------------------------------- -inf logits

# Columns a -inf bias leaves finite, against V = 150, interpreter tiles of 32 columns and vocab
# chunks of 64: "tiles" forbids a tile of the first chunk and the whole second chunk; "one_tile"
# leaves 20 columns of the second chunk, so the first chunk is entirely -inf (the host merge
# starts from a -inf max) and so are the other tiles and the last chunk.
ALLOWED_COLUMNS = {"tiles": [range(0, 32), range(128, V)], "one_tile": [range(70, 90)]}


def _forbid(x: dict, allowed: list[range], key: str) -> dict:
    """x with a -inf bias outside the ``allowed`` columns, target ids drawn from those, and old /
    reference log-probs near the new ones."""
    g = _gen(key)
    cols = torch.tensor([c for r in allowed for c in r])
    bias = torch.full((V,), -float("inf"))
    bias[cols] = x["bias"][cols]
    mask = x["mask"].bool()
    ids = torch.where(mask, cols[torch.randint(0, len(cols), (B, L), generator=g)], x["ids"])
    with torch.no_grad():
        z = _oracle_logits(x["hidden"].double(), x["weight"].double(), bias.double())
        lp = F.log_softmax(z, -1).gather(1, ids.clamp(min=0).view(-1, 1)).view(B, L).float()
    old = torch.where(mask, lp + torch.randn(B, L, generator=g) * 0.3, 0.0)
    refp = torch.where(mask, lp + torch.randn(B, L, generator=g) * 0.3, 0.0)
    return dict(x, bias=bias, ids=ids, old=old, ref=refp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(ALLOWED_COLUMNS))
def test_neg_inf_bias_columns_match_float64(backend, layout):
    """Whole tiles and whole vocab chunks of -inf logits (a bias forbidding token ranges): finite
    log-probs, entropies, losses and gradients equal to the float64 oracle, forward and backward
    (a -inf tile used to make the Triton path's partial sums exp(-inf - -inf) = NaN). The fully
    masked first sequence of the batch is in it too."""
    allowed = ALLOWED_COLUMNS[layout]
    x = _forbid(_grpo_inputs("forbid" + layout), allowed, "forbid" + layout)
    ids = torch.where(x["mask"].bool(), x["ids"], allowed[0][0])  # no padding ids here
    g = _gen("forbid-upstream" + layout)
    up_logp, up_ent = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    h, w, b = _leaf(x["hidden"]), _leaf(x["weight"]), _leaf(x["bias"])
    logp, ent = linear_selective_log_softmax(h, w, ids, b, 0.8, return_entropy=True,
                                             vocab_chunk_size=64, backend=backend)
    ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()
    hd, wd, bd = (_leaf(x[k], torch.float64) for k in ("hidden", "weight", "bias"))
    lsm = F.log_softmax(_oracle_logits(hd, wd, bd) / 0.8, -1)
    logp_ref = lsm.gather(1, ids.view(-1, 1)).view(B, L)
    p = lsm.exp()
    # p * log p is 0 where p == 0 (the -inf columns); written so that its gradient is too.
    ent_ref = -(p * lsm.masked_fill(p == 0, 0.0)).sum(-1).view(B, L)
    ((logp_ref * up_logp).sum() + (ent_ref * up_ent).sum()).backward()
    assert torch.isfinite(logp_ref).all() and torch.isfinite(bd.grad).all()
    _assert_close(logp, logp_ref, 2e-6, "logp")
    _assert_close(ent, ent_ref, 2e-5, "entropy")
    for name, got, want in (("hidden", h.grad, hd.grad), ("weight", w.grad, wd.grad),
                            ("bias", b.grad, bd.grad)):
        _assert_close(got, want, 2e-5, f"grad {name}")
    options = dict(loss_type="dapo", beta=0.04, eps_low=0.2, eps_high=0.28)
    _check_pair(*_loss_pair(x, backend, options, chunk=64))


# The interpreter runs the kernels in numpy, which warns about the log(0) of such a row.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_a_finite_logit_are_nan_as_in_float64(backend):
    """A distribution with no finite logit has no log-probs: NaN, as the float64 oracle says, on
    both paths -- not a value, and not an error."""
    g = _gen("all-inf" + backend)
    hidden, weight = torch.randn(5, 3, 24, generator=g), torch.randn(V, 24, generator=g)
    bias = torch.full((V,), -float("inf"))
    ids = torch.randint(0, V, (5, 3), generator=g)
    logp, ent = linear_selective_log_softmax(hidden, weight, ids, bias, return_entropy=True,
                                             vocab_chunk_size=64, backend=backend)
    lsm = F.log_softmax(_oracle_logits(hidden.double(), weight.double(), bias.double()), -1)
    assert torch.isnan(lsm).all()
    assert torch.isnan(logp).all() and torch.isnan(ent).all()


# ---------------------------------------------------------------- Liger-Kernel


def _liger_cases():
    cases = []
    # Liger 0.8.5's luspo predates TRL 1.16's masked aggregation (it averages unmasked padding
    # into the loss), and Liger refuses sequence-level IS for cispo / sapo / vespo.
    for lt in [t for t in LOSS_TYPES if t != "luspo"]:
        for level in ("token",) if lt in ("cispo", "sapo", "vespo") else ("token", "sequence"):
            beta = _beta(lt, level)
            cases.append(pytest.param(lt, level, beta, id=f"{lt}-{level}-beta{beta}"))
    return cases


@needs_interpreter
@pytest.mark.parametrize("loss_type, level, beta", _liger_cases())
def test_matches_liger_fused_linear_grpo(loss_type, level, beta):
    liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    x = _grpo_inputs(f"liger{loss_type}{level}{beta}")
    # Liger reads every id (it has no notion of padding ids): give it valid ones.
    ids = x["ids"].clamp(min=0)
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    results = []
    for which in ("ours", "liger"):
        h, w, b = _leaf(x["hidden"]), _leaf(x["weight"]), _leaf(x["bias"])
        if which == "ours":
            loss, _ = linear_grpo_loss(
                h, w, ids, x["adv"], old_logp=x["old"], ref_logp=x["ref"],
                completion_mask=x["mask"], bias=b, temperature=0.8, beta=beta, eps_low=0.2,
                eps_high=eps_high, loss_type=loss_type, importance_sampling_level=level,
                max_completion_length=L + 3, backend="triton",
            )
        else:
            module = liger.LigerFusedLinearGRPOLoss(
                beta=beta, compiled=False, use_ref_model=beta != 0.0, chunk_size=3,
                epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type,
                max_completion_length=L + 3, importance_sampling_level=level, temperature=0.8,
            )
            loss, _ = module(h, w, ids, x["mask"], x["adv"], bias=b,
                             ref_per_token_logps=x["ref"], old_per_token_logps=x["old"])
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, b.grad))
    (loss, *grads), (loss_liger, *grads_liger) = results
    _assert_close(loss, loss_liger, 1e-5, "loss vs Liger", atol=1e-7)
    for name, gr, gr_liger in zip(("hidden", "weight", "bias"), grads, grads_liger, strict=True):
        _assert_close(gr, gr_liger, 5e-5, f"grad {name} vs Liger")


# ---------------------------------------------------------------- dtypes, tying, frozen parts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_bf16_hidden_matches_float64_of_rounded_inputs(backend, weight_dtype):
    """bf16 activations (with a bf16 or fp32 master lm_head): fp32 logits and log-probs, and
    gradients in each input's own dtype within bf16 rounding of the float64 truth."""
    x = _grpo_inputs(f"bf16{backend}{weight_dtype}")
    x["hidden"] = x["hidden"].to(torch.bfloat16)
    x["weight"] = x["weight"].to(weight_dtype)
    x["bias"] = x["bias"].to(weight_dtype)
    options = dict(loss_type="dapo", beta=0.05, eps_low=0.2, eps_high=0.28)
    # Triton multiplies in the activations' dtype (as autocast would): the oracle sees the
    # weight rounded the same way. The torch path computes in fp32 from the stored values.
    seen = x if backend == "torch" else dict(x, weight=x["weight"].to(torch.bfloat16))
    ours, oracle = _loss_pair(x, backend, options, chunk=64, oracle_x=seen)
    assert ours[2].dtype == torch.bfloat16
    assert ours[3].dtype == weight_dtype and ours[4].dtype == weight_dtype
    _check_pair(ours, oracle, rtol_loss=1e-4, rtol_grad=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embeddings(backend):
    """The lm_head weight is also the input embedding: both gradient paths add up."""
    g = _gen("tied" + backend)
    emb = torch.randn(V, H, generator=g) / 3
    mix = torch.randn(H, H, generator=g) / H**0.5
    prompt = torch.randint(0, V, (B, L), generator=g)
    ids = torch.randint(0, V, (B, L), generator=g)
    adv = torch.randn(B, generator=g)
    refp = -torch.rand(B, L, generator=g) * 5

    def run(dtype, fused):
        w = _leaf(emb, dtype)
        m = _leaf(mix, dtype)
        hidden = torch.tanh(F.embedding(prompt, w) @ m)
        if fused:
            loss, _ = linear_grpo_loss(hidden, w, ids, adv, ref_logp=refp, beta=0.1,
                                       temperature=0.9, backend=backend)
        else:
            lp = F.log_softmax(hidden @ w.t() / 0.9, -1).gather(-1, ids[..., None])[..., 0]
            loss, _ = ref.grpo_loss_from_logps(lp, None, refp.double(), adv.double(), None,
                                               beta=0.1)
        loss.backward()
        return loss, w.grad, m.grad

    loss, gw, gm = run(torch.float32, True)
    loss_ref, gw_ref, gm_ref = run(torch.float64, False)
    _assert_close(loss, loss_ref, 2e-6, "loss")
    _assert_close(gw, gw_ref, 2e-5, "grad tied weight")
    _assert_close(gm, gm_ref, 2e-5, "grad upstream layer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_lm_head_and_bias(backend):
    """A frozen lm_head (LoRA) gets no gradient; hidden still gets the exact one."""
    x = _grpo_inputs("frozen" + backend)
    h = _leaf(x["hidden"])
    w = x["weight"].clone()
    b = x["bias"].clone()
    loss, _ = linear_grpo_loss(h, w, x["ids"], x["adv"], old_logp=x["old"],
                               completion_mask=x["mask"], bias=b, beta=0.0, temperature=1.0,
                               backend=backend)
    loss.backward()
    assert w.grad is None and b.grad is None
    _, oracle = _loss_pair(x, backend, dict(beta=0.0, temperature=1.0))
    _assert_close(h.grad, oracle[2], 2e-5, "grad hidden")


# ---------------------------------------------------------------- memory and shapes


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes) any torch op creates or copies."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_materialises_the_logits(backend, monkeypatch):
    n, h_dim, v = 64, 16, 203
    # The spec path takes 8 whole rows at a time, the Triton path 32 vocabulary columns.
    monkeypatch.setattr(_dispatch, "CHUNK_ELEMENTS", 8 * v)
    g = _gen("memory" + backend)
    hidden = torch.randn(n, h_dim, generator=g, requires_grad=True)
    weight = torch.randn(v, h_dim, generator=g, requires_grad=True)
    ids = torch.randint(0, v, (n,), generator=g)
    with _LargestAllocation() as probe:
        logp, ent = linear_selective_log_softmax(hidden, weight, ids, None, 1.0, True,
                                                 vocab_chunk_size=32, backend=backend)
        (logp.sum() + ent.sum()).backward()
    # fp32 [N, V] logits would be 52 kB; the largest legitimate tensors are the weight and its
    # gradient (V * H fp32 = 13 kB; the interpreter copies kernel arguments too).
    assert probe.largest <= 4 * max(v * h_dim, n * 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_layouts_agree(backend):
    """[B, L, H], [B, L + 1, H] (logits-kernel layout, last position dropped) and [B * L, H]."""
    x = _grpo_inputs("layouts" + backend)
    extra = torch.randn(B, 1, H)
    losses = []
    for hidden in (x["hidden"], torch.cat([x["hidden"], extra], 1), x["hidden"].reshape(-1, H)):
        loss, _ = linear_grpo_loss(hidden, x["weight"], x["ids"], x["adv"], old_logp=x["old"],
                                   completion_mask=x["mask"], beta=0.0, backend=backend)
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    assert torch.allclose(losses[0], losses[2], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    h = torch.randn(0, 5, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    ids = torch.zeros(0, 5, dtype=torch.long)
    assert linear_selective_log_softmax(h, w, ids, backend=backend).shape == (0, 5)
    loss, _ = linear_grpo_loss(h, w, ids, torch.zeros(0), beta=0.0, backend=backend)
    loss.backward()
    assert h.grad.shape == h.shape and not w.grad.any()


def test_bad_inputs_get_clear_errors():
    x = _grpo_inputs("bad")
    hidden, weight, ids, adv = x["hidden"], x["weight"], x["ids"].clamp(min=0), x["adv"]
    with pytest.raises(ValueError, match="token ids must lie in"):
        linear_grpo_loss(hidden, weight, ids.masked_fill(ids == ids[2, 0], V), adv)
    with pytest.raises(ValueError, match="must end in H"):
        linear_selective_log_softmax(hidden[..., :-1], weight, ids)
    with pytest.raises(ValueError, match="temperature"):
        linear_selective_log_softmax(hidden, weight, ids, temperature=0.0)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_grpo_loss(hidden[:, :-2], weight, ids, adv)
    with pytest.raises(ValueError, match="backend"):
        linear_selective_log_softmax(hidden, weight, ids, backend="cuda")
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        linear_selective_log_softmax(hidden, weight, ids, vocab_chunk_size=0)
    with pytest.raises(ValueError, match="bias"):
        linear_selective_log_softmax(hidden, weight, ids, bias=torch.zeros(V + 1))
    with pytest.raises(TypeError, match="integer"):
        linear_selective_log_softmax(hidden, weight, ids.float())
    if not INTERPRETED:
        with pytest.raises(ValueError, match="CUDA"):
            linear_selective_log_softmax(hidden, weight, ids, backend="triton")


# ---------------------------------------------------------------- compiled kernels on a GPU


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [None, 1000])
def test_cuda_kernels_match_float64(dtype, chunk):
    """The compiled (autotuned) kernels at a shape that spans many tiles and a ragged vocab."""
    g = _gen(f"cuda{dtype}{chunk}")
    b, seq, h_dim, v = 8, 250, 256, 5003
    hidden = torch.randn(b, seq, h_dim, generator=g).to(dtype).cuda()
    weight = (torch.randn(v, h_dim, generator=g) / 8).to(dtype).cuda()
    bias = torch.randn(v, generator=g).to(dtype).cuda()
    ids = torch.randint(0, v, (b, seq), generator=g).cuda()
    mask = (torch.rand(b, seq, generator=g) < 0.9).cuda()
    adv = torch.randn(b, generator=g).cuda()
    with torch.no_grad():
        lp = ref.selective_log_softmax(
            (hidden.double() @ weight.double().t() + bias.double()), ids, 0.8
        ).float()
    old = lp + torch.randn(b, seq, generator=g).cuda() * 0.2
    refp = lp + torch.randn(b, seq, generator=g).cuda() * 0.2
    h, w, bb = _leaf(hidden), _leaf(weight), _leaf(bias)
    loss, _ = linear_grpo_loss(h, w, ids, adv, old_logp=old, ref_logp=refp,
                               completion_mask=mask, bias=bb, temperature=0.8, beta=0.04,
                               vocab_chunk_size=chunk)
    loss.backward()
    hd, wd, bd = (_leaf(t, torch.float64) for t in (hidden, weight, bias))
    lpd = F.log_softmax((hd @ wd.t() + bd) / 0.8, -1).gather(-1, ids[..., None])[..., 0]
    loss_ref, _ = ref.grpo_loss_from_logps(lpd, old.double(), refp.double(), adv.double(), mask,
                                           beta=0.04)
    loss_ref.backward()
    rtol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    _assert_close(loss, loss_ref, 1e-4, "loss")
    for name, gr, gr_ref in (("hidden", h.grad, hd.grad), ("weight", w.grad, wd.grad),
                             ("bias", bb.grad, bd.grad)):
        assert gr.dtype == dtype
        _assert_close(gr, gr_ref, rtol, f"grad {name}")
