"""One GRPO step on the tiny model: the loss equals TRL's formula computed independently in
float64 from a plain forward pass, and zero-variance groups give exactly zero policy gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geovlm.advantages import group_advantages
from geovlm.config import RunConfig, StageConfig
from geovlm.engines.base import EngineSetup, Sampling
from geovlm.engines.builtin import BuiltinEngine
from geovlm.grpo import build_policy_batch, completion_logps, policy_loss
from geovlm.loop import StageContext
from geovlm.runtime import Runtime
from tests.test_model import make_sample, tiny_policy

G = 4


@pytest.fixture(scope="module")
def setup():
    model, processor = tiny_policy(seed=5)
    rng = np.random.default_rng(3)
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (84, 140)))]
    engine = BuiltinEngine(model, processor, EngineSetup())
    rollouts = engine.generate(samples, G, Sampling(max_new_tokens=7, seed=2))
    return model, processor, rollouts


def context(**stage) -> StageContext:
    runtime = Runtime(0, 1, 0, torch.device("cpu"), 1)
    return StageContext(RunConfig(), StageConfig(kind="grpo", **stage), 1, runtime)


def plain_logps(model, rollouts, temperature: float) -> torch.Tensor:
    """float64 log-probs of the completion tokens from HF's own forward (no project helper)."""
    inputs = rollouts.model_inputs()
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.double()
    p = rollouts.prompt_length
    logps = torch.log_softmax(logits[:, p - 1 : -1] / temperature, dim=-1)
    return logps.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)


def test_dapo_loss_matches_trl_formula(setup):
    model, _, rollouts = setup
    ctx = context(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.8, loss_type="dapo")
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.3, 0.9, 0.1, 0.7])
    advantages, _ = group_advantages(rewards, G, "group")
    batch = build_policy_batch(rollouts, advantages, torch.device("cpu"))
    # A reference policy that differs from the current one: the logps shifted per token.
    logp = plain_logps(model, rollouts, 0.8)
    ref = logp + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
    batch.ref_logps = ref.float()
    # Old-policy log-probs far enough away that some ratios leave [1 - 0.2, 1 + 0.28].
    old = logp + 0.4 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    batch.old_logps = old.float()
    loss, metrics = policy_loss(model, batch, ctx)

    mask = rollouts.completion_mask.double()
    adv = advantages.double()[:, None]
    ratio = torch.exp(logp - batch.old_logps.double())
    assert ((ratio < 0.8) | (ratio > 1.28))[mask.bool()].any()
    clipped = ratio.clamp(1 - 0.2, 1 + 0.28)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    want = ((per_token + 0.04 * kl) * mask).sum() / mask.sum()
    assert abs(loss.item() - want.item()) < 1e-5
    assert abs(metrics["kl"].item() - ((kl * mask).sum() / mask.sum()).item()) < 1e-5


def test_reference_logps_helper_matches_plain_forward(setup):
    model, _, rollouts = setup
    batch = build_policy_batch(rollouts, torch.zeros(2 * G), torch.device("cpu"))
    got = completion_logps(model, batch, 0.7).double()
    mask = rollouts.completion_mask.bool()
    torch.testing.assert_close(
        got[mask], plain_logps(model, rollouts, 0.7)[mask], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_zero_variance_groups_give_zero_policy_gradient(setup, loss_type):
    model, _, rollouts = setup
    ctx = context(beta=0.0, loss_type=loss_type, temperature=1.0)
    rewards = torch.full((2 * G,), 0.6)  # every group has equal rewards
    advantages, zero_std = group_advantages(rewards, G, "group")
    assert zero_std.all()
    batch = build_policy_batch(rollouts, advantages, torch.device("cpu"))
    model.zero_grad()
    loss, _ = policy_loss(model, batch, ctx)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    model.zero_grad()


def test_nonzero_advantages_do_move_the_policy(setup):
    model, _, rollouts = setup
    ctx = context(beta=0.0, loss_type="grpo", temperature=1.0)
    advantages, _ = group_advantages(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 1]), G, "group")
    batch = build_policy_batch(rollouts, advantages, torch.device("cpu"))
    model.zero_grad()
    policy_loss(model, batch, ctx)[0].backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.parameters() if p.grad is not None)
    model.zero_grad()


@pytest.mark.parametrize("share_prompt", [True, False])
def test_logps_helper_matches_plain_forward_either_way(setup, share_prompt):
    model, _, rollouts = setup
    batch = build_policy_batch(rollouts, torch.zeros(2 * G), torch.device("cpu"))
    got = completion_logps(model, batch, 0.9, share_prompt=share_prompt).double()
    mask = rollouts.completion_mask.bool()
    want = plain_logps(model, rollouts, 0.9)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)


def _loss_and_grads(model, batch, ctx, fused_linear=False):
    model.zero_grad()
    loss, _ = policy_loss(model, batch, ctx, fused_linear)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize(
    ("fused_linear", "checkpointing"), [("off", False), ("on", False), ("off", True)]
)
def test_shared_prompt_policy_loss_equals_the_full_forward(setup, fused_linear, checkpointing):
    """Same loss and gradients (vision tower included) with each prompt run once or G times,
    with or without activation checkpointing."""
    from geovlm.model import disable_checkpointing, enable_checkpointing

    model, _, rollouts = setup
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.3, 0.9, 0.1, 0.7])
    advantages, _ = group_advantages(rewards, G, "group")
    batch = build_policy_batch(rollouts, advantages, torch.device("cpu"))
    batch.ref_logps = completion_logps(model, batch, 1.0) - 0.05
    results = []
    for share in (True, False):
        ctx = context(beta=0.04, loss_type="dapo", prompt_sharing=share)
        if checkpointing and share:
            enable_checkpointing(model)
        try:
            results.append(_loss_and_grads(model, batch, ctx, fused_linear == "on"))
        finally:
            disable_checkpointing(model)
    (shared_loss, shared_grads), (full_loss, full_grads) = results
    assert abs(shared_loss - full_loss) < 1e-6
    assert shared_grads.keys() == full_grads.keys()
    assert any(name.startswith("model.visual") for name in full_grads)
    for name, grad in full_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-5 * scale + 1e-9)


def test_sharing_follows_the_stage_option():
    from geovlm.grpo import shares_prompts

    assert shares_prompts(context())
    assert not shares_prompts(context(prompt_sharing=False))
