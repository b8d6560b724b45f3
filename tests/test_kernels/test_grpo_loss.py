"""Fused GRPO loss over logits against its oracles: the float64 reference (differentiated by
autograd through ``log_softmax``) for every option, forward and gradients, on both backends
(Triton through the interpreter, and the chunked torch path); and Liger's ``triton_grpo_loss``
where the options overlap."""

from __future__ import annotations

import inspect
import subprocess
import sys
import zlib

import pytest
import torch

from geovlm.kernels import _dispatch
from geovlm.kernels import reference as ref
from geovlm.kernels.grpo_loss import fused_log_probs, grpo_loss
from geovlm.kernels.options import LOSS_TYPES

from .conftest import needs_cuda, needs_interpreter

B, L, V = 3, 17, 1031
BACKENDS = [pytest.param("triton", marks=needs_interpreter), "torch"]


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _case(seed, *, b=B, seq=L, vocab=V, dtype=torch.float32, device="cpu", scale=3.0,
          temperature=1.0):
    """logits [B, L+1, V]; old / ref log-probs near the true ones so ratios straddle the clip
    range; a ragged mask with one fully masked sequence; a zero advantage."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, seq + 1, vocab, generator=g) * scale).to(dtype)
    ids = torch.randint(0, vocab, (b, seq), generator=g)
    mask = (torch.rand(b, seq, generator=g) < 0.8).long()
    mask[0, seq // 2:] = 0
    if b > 2:
        mask[2] = 0
    true = ref.selective_log_softmax(logits[:, :seq].double(), ids, temperature).float()
    old = true + torch.randn(b, seq, generator=g) * 0.3
    refp = true + torch.randn(b, seq, generator=g) * 0.3
    adv = torch.randn(b, generator=g)
    adv[-1] = 0.0
    t = dict(logits=logits, ids=ids, mask=mask, old=old, ref=refp, adv=adv, g=g)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}


def _oracle(c, temperature, reduce, weights, **opts):
    """float64 reference loss (or weighted per-token outputs) and its gradient w.r.t. logits."""
    x = c["logits"].detach().double().requires_grad_(True)
    seq = c["ids"].shape[1]
    dbl = lambda t: None if t is None else t.double()
    logp = ref.selective_log_softmax(x[:, :seq], c["ids"], temperature)
    terms = ref.grpo_per_token_loss(
        logp, dbl(opts.pop("old")), dbl(opts.pop("ref")), c["adv"].double(), c["mask"],
        **{k: (dbl(v) if torch.is_tensor(v) else v) for k, v in opts.items()
           if k not in ("max_completion_length", "num_items_in_batch")},
    )
    if reduce:
        out = ref.reduce_grpo_loss(
            terms.per_token_loss, terms.mask, opts["loss_type"],
            opts.get("max_completion_length"), opts.get("num_items_in_batch"),
        )
        objective = out
    else:
        out = terms.per_token_loss * terms.mask
        objective = (out * weights.double()).sum()
    objective.backward()
    return out.detach(), x.grad, terms


def _run(c, backend, temperature, reduce, weights, inplace=False, **opts):
    x = c["logits"].clone().requires_grad_(True)
    out = grpo_loss(x, opts.pop("old"), opts.pop("ref"), c["ids"], c["adv"], c["mask"],
                    temperature=temperature, inplace=inplace, reduce=reduce, backend=backend,
                    **opts)
    objective = out[0] if reduce else (out[0] * weights).sum()
    objective.backward()
    return out, x.grad


def _close(got, want, rtol=2e-5, atol_scale=2e-6):
    want = want.double()
    atol = atol_scale * max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


# Each option with two of the loss types it interacts with (PPO clipping, sequence-level ratios,
# detached weights), so every option meets both importance-sampling levels.
OPTION_CASES = [
    ("grpo", "token", dict(delta=1.3)),
    ("luspo", "sequence", dict(delta=1.1)),
    ("dapo", "token", dict(use_bias_correction_kl=True, delta=1.25)),
    ("grpo", "sequence", dict(use_bias_correction_kl=True)),
    ("dapo", "token", dict(vllm_is_ratio="token")),
    ("vespo", "token", dict(vllm_is_ratio="token")),
    ("grpo", "sequence", dict(vllm_is_ratio="sequence", use_bias_correction_kl=True)),
    ("sapo", "token", dict(vllm_is_ratio="flat")),
    ("cispo", "sequence", dict(old=None)),
    ("bnpo", "token", dict(old=None)),
    ("vespo", "sequence", dict(beta=0.0, ref=None)),
    ("dr_grpo", "token", dict(beta=0.0, ref=None, max_completion_length=40)),
    ("dapo", "sequence", dict(num_items_in_batch=77)),
    ("cispo", "token", dict(num_items_in_batch=30, vllm_is_ratio="sequence")),
]


def _options(c, loss_type, level, extra):
    opts = dict(old=c["old"], ref=c["ref"], beta=0.04, eps_low=0.2,
                eps_high=4.0 if loss_type == "cispo" else 0.28, loss_type=loss_type,
                importance_sampling_level=level)
    extra = dict(extra)
    kind = extra.pop("vllm_is_ratio", None)
    b, seq = c["ids"].shape
    shapes = {"token": (b, seq), "sequence": (b, 1), "flat": (b,)}
    if kind is not None:
        noise = torch.randn(*shapes[kind], generator=c["g"]) * 0.2
        opts["vllm_is_ratio"] = torch.exp(noise).to(c["logits"].device)
    opts.update(extra)
    return opts


def _check(c, backend, loss_type, level, extra, temperature):
    for reduce in (True, False):
        weights = torch.rand(c["ids"].shape, generator=c["g"]).to(c["logits"].device)
        opts = _options(c, loss_type, level, extra)
        want, want_grad, terms = _oracle(c, temperature, reduce, weights, **dict(opts))
        out, grad = _run(c, backend, temperature, reduce, weights, **opts)
        # VESPO's weight exp(k log w - lambda w) sums fp32 log-ratios over the whole sequence, so
        # its relative error is a few times the per-token one.
        rtol = 1e-4 if loss_type == "vespo" else 2e-5
        _close(out[0].detach(), want, rtol=rtol)
        _close(grad, want_grad, rtol=rtol)
        if not reduce:
            mask = terms.mask
            _close(out[2], terms.is_clipped * mask, atol_scale=0)
            if terms.per_token_kl is None:
                assert out[1] is None
            else:
                _close(out[1], terms.per_token_kl.detach() * mask)
        assert grad[:, -1].abs().max() == 0  # the dropped last position gets no gradient
    assert want_grad.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_float64_reference(backend, loss_type, level):
    temperature = 0.9 if level == "token" else 1.0
    c = _case(_seed(loss_type, level), temperature=temperature)
    _check(c, backend, loss_type, level, {}, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level,extra", OPTION_CASES)
def test_options_match_float64_reference(backend, loss_type, level, extra):
    c = _case(_seed(loss_type, level, sorted(extra)), temperature=0.7)
    _check(c, backend, loss_type, level, extra, 0.7)


@needs_interpreter
def test_multi_block_rows_with_whole_neg_inf_blocks():
    """Several vocab blocks per row (so the online logsumexp rescales), a first block that is all
    -inf, all-negative rows far from 0, and a large positive row."""
    block = _dispatch.INTERPRETER_BLOCK_V
    c = _case(21, vocab=2 * block + 17)
    c["logits"][0, :, :block] = -float("inf")
    c["ids"][0] = torch.randint(block, 2 * block + 17, (L,), generator=c["g"])
    c["logits"][1] -= 1e4
    c["logits"][2] += 1e4
    c["mask"][2] = 1
    opts = _options(c, "grpo", "token", {"use_bias_correction_kl": True})
    weights = torch.ones(B, L)
    want, want_grad, _ = _oracle(c, 1.0, True, weights, **dict(opts))
    out, grad = _run(c, "triton", 1.0, True, weights, **opts)
    assert torch.isfinite(grad).all()
    _close(out[0].detach(), want, rtol=1e-4)
    _close(grad, want_grad, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_writes_the_gradient_into_the_logits(backend):
    c = _case(5, temperature=0.9)
    opts = _options(c, "dapo", "sequence", {"use_bias_correction_kl": True})
    weights = torch.ones(B, L)
    _, want_grad = _run(c, backend, 0.9, True, weights, **dict(opts))
    leaf = c["logits"].clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf, like a model's output
    seen = []
    x.register_hook(seen.append)
    loss, _ = grpo_loss(x, opts.pop("old"), opts.pop("ref"), c["ids"], c["adv"], c["mask"],
                        temperature=0.9, inplace=True, reduce=True, backend=backend, **opts)
    loss.backward()
    assert seen[0].data_ptr() == x.data_ptr()
    torch.testing.assert_close(leaf.grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits(backend):
    """bf16 in, fp32 math, bf16 gradient: within bf16 rounding of the float64 oracle."""
    c = _case(8, dtype=torch.bfloat16, temperature=0.9)
    opts = _options(c, "grpo", "token", {"delta": 1.4})
    weights = torch.ones(B, L)
    want, want_grad, _ = _oracle(c, 0.9, True, weights, **dict(opts))
    out, grad = _run(c, backend, 0.9, True, weights, **opts)
    assert grad.dtype == torch.bfloat16 and out[0].dtype == torch.float32
    _close(out[0].detach(), want)
    _close(grad, want_grad, rtol=1e-2, atol_scale=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_are_never_read(backend):
    """NaN logits under the mask (and at the dropped position) give exact zeros, no NaN; a batch
    with every token masked gives a zero loss and zero gradient."""
    c = _case(13)
    pad = c["mask"] == 0
    clean = _case(13)
    c["logits"][:, :L][pad] = float("nan")
    c["logits"][:, L] = float("nan")
    opts = _options(c, "dapo", "token", {})
    weights = torch.ones(B, L)
    want, want_grad, _ = _oracle(clean, 1.0, True, weights, **dict(opts))
    out, grad = _run(c, backend, 1.0, True, weights, **opts)
    _close(out[0].detach(), want)
    assert (grad[:, :L][pad] == 0).all() and (grad[:, L] == 0).all()
    _close(grad[:, :L][~pad], want_grad[:, :L][~pad])
    c["mask"].zero_()
    out, grad = _run(c, backend, 1.0, True, weights, **_options(c, "grpo", "sequence", {}))
    assert out[0].item() == 0 and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_without_the_extra_position_and_strided(backend):
    """[B, L, V] logits (TRL's layout) sliced out of a larger tensor, int32 ids, bool mask."""
    c = _case(17)
    big = torch.randn(B, L + 4, V)
    big[:, 2:L + 2] = c["logits"][:, :L]
    view = big[:, 2:L + 2]
    ids32 = c["ids"].int()
    logp, ent = fused_log_probs(view, ids32, c["mask"].bool(), 1.0, return_entropy=True,
                                backend=backend)
    want = ref.selective_log_softmax(c["logits"][:, :L].double(), c["ids"]) * c["mask"]
    _close(logp, want)
    _close(ent, ref.entropy_from_logits(c["logits"][:, :L].double()) * c["mask"])
    leaf = big.clone().requires_grad_(True)
    logp, _ = fused_log_probs(leaf[:, 2:L + 2], ids32, c["mask"].bool(), 1.0, backend=backend)
    (logp * c["adv"][:, None]).sum().backward()
    x64 = c["logits"][:, :L].double().requires_grad_(True)
    want_logp = ref.selective_log_softmax(x64, c["ids"]) * c["mask"]
    (want_logp * c["adv"][:, None].double()).sum().backward()
    _close(leaf.grad[:, 2:L + 2], x64.grad)
    assert (leaf.grad[:, :2] == 0).all() and (leaf.grad[:, L + 2:] == 0).all()


def test_torch_path_bounds_its_chunks(monkeypatch):
    """The CPU path works a few rows at a time and still matches (chunk of 2 rows here)."""
    monkeypatch.setattr(_dispatch, "CHUNK_ELEMENTS", 2 * V)
    c = _case(19)
    _check(c, "torch", "grpo", "sequence", {"use_bias_correction_kl": True}, 1.0)


def test_bad_inputs_raise_clear_errors():
    c = _case(2)
    args = (c["logits"], c["old"], c["ref"], c["ids"], c["adv"], c["mask"])
    with pytest.raises(ValueError, match="L \\+ 1"):
        grpo_loss(c["logits"][:, :3], *args[1:])
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo_loss(c["logits"], c["old"], None, c["ids"], c["adv"], c["mask"], beta=0.1)
    with pytest.raises(ValueError, match="backend"):
        grpo_loss(*args, backend="cuda")
    with pytest.raises(ValueError, match="temperature"):
        grpo_loss(*args, temperature=0.0)
    with pytest.raises(ValueError, match="ids must be int"):
        grpo_loss(c["logits"], c["old"], c["ref"], c["ids"].float(), c["adv"], c["mask"])


# Liger's triton_grpo_loss as a second oracle, where the options overlap. The documented
# differences (luspo's reduction, vespo / cispo / sapo at sequence level, delta outside PPO
# clipping) are tested below, after the overlap.
LIGER_CASES = [
    ("grpo", "token", {}), ("bnpo", "token", {"delta": 1.3}), ("dr_grpo", "token", {}),
    ("dapo", "token", {"vllm_is_ratio": "token", "use_bias_correction_kl": True}),
    ("cispo", "token", {}), ("sapo", "token", {"vllm_is_ratio": "sequence"}),
    ("vespo", "token", {"vllm_is_ratio": "token"}), ("grpo", "sequence", {"delta": 1.2}),
    ("dapo", "sequence", {"use_bias_correction_kl": True}), ("bnpo", "token", {"old": None}),
]


@needs_interpreter
@pytest.mark.parametrize("loss_type,level,extra", LIGER_CASES)
def test_matches_liger(loss_type, level, extra):
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    c = _case(_seed("liger", loss_type, level, sorted(extra)), temperature=0.9)
    opts = _options(c, loss_type, level, extra)
    for reduce in (True, False):
        weights = torch.rand(B, L, generator=c["g"])
        outs, grads = [], []
        for fn in (grpo_loss, liger.triton_grpo_loss):
            x = c["logits"].clone().requires_grad_(True)
            kw = dict(opts)
            out = fn(x, kw.pop("old"), kw.pop("ref"), c["ids"], c["adv"], c["mask"],
                     temperature=0.9, inplace=False, reduce=reduce, **kw)
            (out[0] if reduce else (out[0] * weights).sum()).backward()
            outs.append(out)
            grads.append(x.grad)
        ours, theirs = outs
        _close(ours[0].detach(), theirs[0].detach(), rtol=1e-4)
        _close(grads[0], grads[1], rtol=1e-4)
        if reduce:
            assert len(ours[1]) == len(theirs[1])
            for a, b in zip(ours[1], theirs[1], strict=True):
                _close(a, b, rtol=1e-4)
        else:
            _close(ours[1], theirs[1], rtol=1e-4)
            _close(ours[2], theirs[2], atol_scale=0)


# How far the drop-in goes: each documented difference from Liger (grpo_loss's docstring), with
# Liger's installed implementation showing it and the float64 oracle (TRL's math, checked against
# TRL in test_reference.py) showing that ours is TRL's.


def test_signature_is_liger_triton_grpo_loss():
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    ours = inspect.signature(grpo_loss).parameters.values()
    theirs = inspect.signature(liger.triton_grpo_loss).parameters.values()
    shared = [(p.name, p.default) for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert shared == [(p.name, p.default) for p in theirs]
    extra = [p.name for p in ours if p.kind is p.KEYWORD_ONLY]
    assert extra == ["options", "named_metrics", "backend"]


def _liger_and_ours(liger, c, opts, reduce=True):
    out = []
    for fn in (grpo_loss, liger.triton_grpo_loss):
        kw = dict(opts)
        out.append(fn(c["logits"].clone(), kw.pop("old"), kw.pop("ref"), c["ids"], c["adv"],
                      c["mask"], temperature=0.9, inplace=False, reduce=reduce, **kw)[0])
    return out


@needs_interpreter
def test_luspo_reduces_as_trl_where_liger_differs():
    """TRL 1.16 (and we): the masked sum per sequence, averaged over sequences. Liger 0.8.5: the
    mean over all B * L positions of loss * completion length. Equal without padding only."""
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    for level in ("token", "sequence"):
        c = _case(_seed("luspo", level), temperature=0.9)
        opts = _options(c, "luspo", level, {})
        ours, theirs = _liger_and_ours(liger, c, opts)
        want, _, _ = _oracle(c, 0.9, True, None, **dict(opts))
        _close(ours, want)
        assert abs(ours.item() - theirs.item()) > 1e-3 * abs(want.item()), level
        c["mask"].fill_(1)
        ours, theirs = _liger_and_ours(liger, c, _options(c, "luspo", level, {}))
        _close(ours, theirs, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_sequence_level_cispo_sapo_vespo_are_computed_where_liger_refuses(loss_type):
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    # fp64 logits: the spec path then computes in fp64, as exact as the oracle.
    c = _case(_seed("sequence-only", loss_type), temperature=0.9, dtype=torch.float64)
    opts = _options(c, loss_type, "sequence", {})
    kw = dict(opts)
    with pytest.raises(ValueError, match="(?i)sequence|level='token'"):
        liger.triton_grpo_loss(c["logits"].clone(), kw.pop("old"), kw.pop("ref"), c["ids"],
                               c["adv"], c["mask"], temperature=0.9, reduce=True, **kw)
    want, _, _ = _oracle(c, 0.9, True, None, **dict(opts))
    out, _ = _run(c, "torch", 0.9, True, None, **opts)
    _close(out[0].detach(), want, rtol=1e-10, atol_scale=1e-12)


@needs_interpreter
@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_delta_is_ignored_outside_ppo_clipping_where_liger_refuses_it(loss_type):
    """TRL clamps the ratio with delta only for the PPO-clipped loss types (test_reference)."""
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    c = _case(_seed("delta", loss_type), temperature=0.9)
    opts = _options(c, loss_type, "token", {"delta": 1.05})
    kw = dict(opts)
    with pytest.raises(ValueError, match="delta"):
        liger.triton_grpo_loss(c["logits"].clone(), kw.pop("old"), kw.pop("ref"), c["ids"],
                               c["adv"], c["mask"], temperature=0.9, reduce=True, **kw)
    with_delta, _ = _run(c, "torch", 0.9, True, None, **opts)
    without, _ = _run(c, "torch", 0.9, True, None, **_options(c, loss_type, "token", {}))
    assert with_delta[0].item() == without[0].item()


@needs_interpreter
def test_token_normaliser_needs_num_items_in_batch_under_data_parallelism(monkeypatch):
    """In a (faked) two-process world, Liger all-reduces the dapo normaliser inside the loss; ours
    communicates nothing: without num_items_in_batch it is this call's token count, with the
    global count (the caller's all-reduce) it is Liger's."""
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    other_rank_tokens = 23.0
    collectives = []

    def all_reduce(t, op=None):
        collectives.append(op)
        t.add_(other_rank_tokens)

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    c = _case(_seed("world"), temperature=0.9)
    opts = _options(c, "dapo", "token", {})
    ours, theirs = _liger_and_ours(liger, c, opts)
    assert len(collectives) == 1  # Liger's
    n = float(c["mask"].sum())
    _close(ours * n / ((n + other_rank_tokens) / 2), theirs, rtol=1e-4)
    ours, _ = _liger_and_ours(liger, c, dict(opts, num_items_in_batch=n + other_rank_tokens))
    assert len(collectives) == 1  # given the count, neither communicates
    _close(ours, theirs, rtol=1e-4)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"),
                                             ("vespo", "token")])
def test_cuda_kernel_matches_float64_reference(dtype, loss_type, level):
    """The compiled kernel on a real GPU, at a Qwen2.5-VL vocabulary, in place."""
    c = _case(_seed("cuda", loss_type, level), b=2, seq=37, vocab=151_936, dtype=dtype,
              device="cuda", temperature=0.9)
    opts = _options(c, loss_type, level, {"use_bias_correction_kl": True})
    weights = torch.ones(2, 37, device="cuda")
    want, want_grad, _ = _oracle(c, 0.9, True, weights, **dict(opts))
    x = c["logits"].clone().requires_grad_(True)
    loss, _ = grpo_loss(x, opts.pop("old"), opts.pop("ref"), c["ids"], c["adv"], c["mask"],
                        temperature=0.9, inplace=True, reduce=True, **opts)
    loss.backward()
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-5
    _close(loss.detach(), want, rtol=2e-5)
    _close(x.grad, want_grad, rtol=tol, atol_scale=tol)


@needs_cuda
@pytest.mark.cuda
def test_cuda_matches_liger_at_qwen_vocab():
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    c = _case(_seed("cuda-liger"), b=2, seq=37, vocab=151_936, dtype=torch.bfloat16,
              device="cuda", temperature=0.9)
    opts = _options(c, "dapo", "token", {"vllm_is_ratio": "token"})
    grads, losses = [], []
    for fn in (grpo_loss, liger.triton_grpo_loss):
        x = c["logits"].clone().requires_grad_(True)
        kw = dict(opts)
        loss, _ = fn(x, kw.pop("old"), kw.pop("ref"), c["ids"], c["adv"], c["mask"],
                     temperature=0.9, inplace=False, reduce=True, **kw)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, x)[0])
    _close(losses[0], losses[1], rtol=1e-4)
    _close(grads[0], grads[1], rtol=1e-2, atol_scale=1e-2)


def test_package_import_stays_standalone():
    """``import geovlm.kernels`` pulls in neither transformers, trl nor numba."""
    code = ("import sys, geovlm.kernels; "
            "print(sorted(m for m in ('transformers', 'trl', 'numba') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
