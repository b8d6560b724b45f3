"""The spec against its oracles: TRL's own ``GRPOTrainer._compute_loss`` (run on a stand-in trainer
whose model returns given log-probs) for every loss_type and option, and TRL / plain float64 torch
for selective log-softmax and entropy."""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from geovlm.kernels import reference as ref
from geovlm.kernels.options import LOSS_TYPES

trl_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

B, L = 5, 13


def _inputs(seed: int, *, dtype=torch.float64):
    """Random GRPO inputs with ratios on both sides of the clip range, zero advantages, a short
    sequence, and one fully masked sequence (the edge cases TRL's normalisers care about)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, L, generator=g) < 0.85).to(torch.int64)
    mask[0] = 0
    mask[1, 3:] = 0
    mask[2] = 1
    logps = -torch.rand(B, L, generator=g, dtype=dtype) * 3
    old = logps + torch.randn(B, L, generator=g, dtype=dtype) * 0.4
    refp = logps + torch.randn(B, L, generator=g, dtype=dtype) * 0.3
    adv = torch.randn(B, generator=g, dtype=dtype)
    adv[3] = 0.0
    # What TRL's fused LM head returns at masked positions is 0: feed both sides that.
    logps, old, refp = (t * mask for t in (logps, old, refp))
    return SimpleNamespace(logps=logps, old=old, ref=refp, adv=adv, mask=mask, g=g)


def _trl_loss(x, *, loss_type, level, beta, eps_low, eps_high, delta=None, bias_kl=False,
              vllm_ratio=None, old=True, num_items=None, max_completion_length=None,
              sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0)):
    """TRL's ``_compute_loss``, unchanged, on a stand-in trainer: (loss, grad, metrics)."""
    logps = x.logps.clone().requires_grad_(True)
    metrics = {"eval": defaultdict(list)}
    accel = SimpleNamespace(
        gather=lambda t: t, gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t,
        num_processes=1, sync_gradients=True,
    )
    args = SimpleNamespace(
        delta=delta, use_bias_correction_kl=bias_kl, sapo_temperature_pos=sapo[0],
        sapo_temperature_neg=sapo[1], vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1],
        vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3], steps_per_generation=1,
    )
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, args=args,
        get_gamma_weights=trl_trainer.GRPOTrainer.get_gamma_weights,
        use_vllm=vllm_ratio is not None, vllm_importance_sampling_correction=vllm_ratio is not None,
        model=SimpleNamespace(training=False), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length or L, accelerator=accel,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=metrics,
    )
    n_items = x.mask.sum() if num_items is None else num_items
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, L, dtype=torch.long),
        "completion_mask": x.mask,
        "advantages": x.adv,
        "num_items_in_batch": torch.as_tensor(n_items, dtype=torch.float64),
        "ref_per_token_logps": x.ref,
    }
    if old:
        inputs["old_per_token_logps"] = x.old
    if vllm_ratio is not None:
        inputs["importance_sampling_ratio"] = vllm_ratio
    loss = trl_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    logged = {k: v[0] for k, v in metrics["eval"].items() if k != "entropy"}
    return loss.detach(), logps.grad, logged


def _ours(x, *, loss_type, level, beta, eps_low, eps_high, delta=None, bias_kl=False,
          vllm_ratio=None, old=True, num_items=None, max_completion_length=None, logps=None):
    leaf = (x.logps if logps is None else logps).clone().requires_grad_(True)
    loss, metrics = ref.grpo_loss_from_logps(
        leaf, x.old if old else None, x.ref, x.adv, x.mask, beta=beta, eps_low=eps_low,
        eps_high=eps_high, loss_type=loss_type, importance_sampling_level=level, delta=delta,
        use_bias_correction_kl=bias_kl, vllm_is_ratio=vllm_ratio,
        num_items_in_batch=x.mask.sum() if num_items is None else num_items,
        max_completion_length=max_completion_length,
    )
    loss.backward()
    return loss.detach(), leaf.grad, {k: v.item() for k, v in metrics.items()}


def _assert_same(ours, theirs):
    loss, grad, metrics = ours
    t_loss, t_grad, t_metrics = theirs
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, t_loss.to(loss.dtype), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, t_grad, rtol=1e-12, atol=1e-14)
    assert set(metrics) == set(t_metrics)
    for k, v in t_metrics.items():
        # TRL counts clipped tokens in fp32 (``.float()``); the spec counts in the compute dtype.
        both_nan = math.isnan(v) and math.isnan(metrics[k])
        assert both_nan or metrics[k] == pytest.approx(v, rel=1e-6), k


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl_every_loss_type(loss_type, level):
    x = _inputs(zlib.crc32(repr((loss_type, level)).encode()))
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    kw = dict(loss_type=loss_type, level=level, beta=0.04, eps_low=0.2, eps_high=eps_high)
    _assert_same(_ours(x, **kw), _trl_loss(x, **kw))
    assert _ours(x, **kw)[1].abs().sum() > 0  # the gradient is not trivially zero


@pytest.mark.parametrize(
    "loss_type,level,extra",
    [
        ("grpo", "token", dict(delta=1.3)),
        ("dapo", "sequence", dict(delta=1.1, bias_kl=True)),
        ("bnpo", "token", dict(bias_kl=True)),
        ("dr_grpo", "token", dict(max_completion_length=40, bias_kl=True)),
        ("luspo", "sequence", dict(bias_kl=True, delta=1.2)),
        ("dapo", "token", dict(vllm="token", num_items=97)),
        ("grpo", "sequence", dict(vllm="sequence", bias_kl=True)),
        ("cispo", "token", dict(vllm="token", old=False)),
        ("sapo", "token", dict(vllm="sequence", bias_kl=True)),
        ("vespo", "token", dict(vllm="token", num_items=41)),
        ("vespo", "token", dict(vllm="sequence", old=False)),
        ("grpo", "token", dict(old=False, beta=0.0)),
        ("dapo", "sequence", dict(old=False, beta=0.0)),
        ("sapo", "sequence", dict(beta=0.0)),
        # delta clamps only the PPO-clipped types' ratio; Liger refuses it for these three.
        ("cispo", "sequence", dict(delta=1.1)),
        ("sapo", "token", dict(delta=1.1)),
        ("vespo", "token", dict(delta=1.1)),
    ],
)
def test_matches_trl_options(loss_type, level, extra):
    x = _inputs(zlib.crc32(repr((loss_type, level, str(extra))).encode()))
    extra = dict(extra)
    vllm = extra.pop("vllm", None)
    if vllm == "token":
        extra["vllm_ratio"] = torch.exp(torch.randn(B, L, generator=x.g, dtype=torch.float64) * 0.2)
        extra["vllm_ratio"][2, 4] = 0.0  # token_mask mode zeroes a token's ratio
    elif vllm == "sequence":
        extra["vllm_ratio"] = torch.exp(torch.randn(B, 1, generator=x.g, dtype=torch.float64) * 0.2)
    kw = dict(loss_type=loss_type, level=level, beta=extra.pop("beta", 0.04), eps_low=0.2,
              eps_high=3.0 if loss_type == "cispo" else 0.28, **extra)
    _assert_same(_ours(x, **kw), _trl_loss(x, **kw))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo"])
def test_masked_garbage_does_not_leak(loss_type):
    """Padding positions may hold anything (uninitialised memory, -inf log-probs): no effect."""
    x = _inputs(7)
    kw = dict(loss_type=loss_type, level="sequence" if loss_type == "dapo" else "token", beta=0.1,
              eps_low=0.2, eps_high=0.28, bias_kl=True)
    clean = _ours(x, **kw)
    pad = x.mask == 0
    dirty = SimpleNamespace(**vars(x))
    dirty.old = x.old.masked_fill(pad, float("nan"))
    dirty.ref = x.ref.masked_fill(pad, float("inf"))
    got = _ours(dirty, **kw, logps=x.logps.masked_fill(pad, -float("inf")))
    torch.testing.assert_close(got[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], clean[1], rtol=0, atol=0)


def test_fp32_inputs_compute_in_fp32_and_agree_with_fp64():
    x = _inputs(11)
    x32 = SimpleNamespace(**{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                             for k, v in vars(x).items()})
    kw = dict(loss_type="grpo", level="token", beta=0.04, eps_low=0.2, eps_high=0.28)
    loss32, grad32, _ = _ours(x32, **kw)
    loss64, grad64, _ = _ours(x, **kw)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-5, atol=1e-6)


def test_bad_options_raise_clear_errors():
    x = _inputs(3)
    with pytest.raises(ValueError, match="loss_type"):
        ref.grpo_loss_from_logps(x.logps, x.old, x.ref, x.adv, x.mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ref.grpo_loss_from_logps(
            x.logps, x.old, x.ref, x.adv, x.mask, importance_sampling_level="seq"
        )
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        ref.grpo_loss_from_logps(x.logps, x.old, None, x.adv, x.mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        ref.grpo_loss_from_logps(x.logps, x.old, x.ref, x.adv[:-1], x.mask)
    with pytest.raises(ValueError, match="completion_mask"):
        ref.grpo_loss_from_logps(x.logps, x.old, x.ref, x.adv, x.mask[:, :-1])
    with pytest.raises(ValueError, match="sapo"):
        ref.grpo_loss_from_logps(x.logps, x.old, x.ref, x.adv, x.mask, loss_type="sapo",
                                 sapo_temperature_neg=0.0)


def _logits(seed, shape=(3, 17, 1031), dtype=torch.float64, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    ids = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits, ids


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_selective_log_softmax_and_entropy_match_trl(temperature):
    logits, ids = _logits(5)
    got = ref.selective_log_softmax(logits, ids, temperature)
    want = trl_utils.selective_log_softmax(logits, ids, temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    naive = torch.log_softmax(logits / temperature, -1)
    want_naive = naive.gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(got, want_naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.entropy_from_logits(logits, temperature),
                               trl_utils.entropy_from_logits(logits / temperature),
                               rtol=1e-12, atol=1e-12)


def test_log_softmax_extreme_logits():
    """All-negative rows far from 0, -inf entries, and bf16 inputs computed in fp32."""
    logits, ids = _logits(9, shape=(2, 5, 300))
    logits[0] -= 1e4
    logits[1, :, ::3] = -float("inf")
    ids[1] = torch.arange(5) * 3 + 1  # targets stay finite
    got = ref.selective_log_softmax(logits, ids)
    assert torch.isfinite(got).all()
    want = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ent = ref.entropy_from_logits(logits)
    assert torch.isfinite(ent).all()
    p = torch.softmax(logits[1], -1)
    want_ent = -(p * torch.log_softmax(logits[1], -1)).nan_to_num().sum(-1)
    torch.testing.assert_close(ent[1], want_ent, rtol=1e-12, atol=1e-12)
    bf = logits[0].to(torch.bfloat16)
    got_bf = ref.selective_log_softmax(bf, ids[0])
    assert got_bf.dtype == torch.float32
    want_bf = torch.log_softmax(bf.double(), -1).gather(-1, ids[0][..., None])[..., 0]
    torch.testing.assert_close(got_bf.double(), want_bf, rtol=1e-5, atol=1e-5)


def test_temperature_must_be_positive():
    logits, ids = _logits(1, shape=(1, 2, 7))
    with pytest.raises(ValueError, match="temperature"):
        ref.selective_log_softmax(logits, ids, 0.0)
    with pytest.raises(ValueError, match="ids shape"):
        ref.selective_log_softmax(logits, ids[:, :1])
