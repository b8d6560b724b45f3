"""Group advantages against hand-computed groups and TRL's formula."""

import math

import pytest
import torch

from geovlm.advantages import group_advantages


def test_hand_computed_group():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv, zero = group_advantages(rewards, 4, "group")
    # group 1: mean 0.5, unbiased std sqrt((0.25+0.25+0+0)/3)
    std = math.sqrt(0.5 / 3)
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0]
    assert torch.allclose(adv[:4], torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert torch.equal(adv[4:], torch.zeros(4, dtype=torch.float64))
    assert zero.tolist() == [False] * 4 + [True] * 4


def test_mean_only_and_batch_scaling():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    adv, _ = group_advantages(rewards, 2, "none")
    assert adv.tolist() == [0.5, -0.5, 1.0, -1.0]
    adv, _ = group_advantages(rewards, 2, "batch")
    batch_std = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=torch.float64).std()
    want = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64) / (batch_std + 1e-4)
    assert torch.allclose(adv, want, atol=1e-12)


def test_equal_rewards_that_do_not_average_exactly_give_exact_zero():
    rewards = torch.full((3,), 0.1)
    adv, zero = group_advantages(rewards, 3, "group")
    assert torch.equal(adv, torch.zeros(3, dtype=torch.float64)) and zero.all()


def test_matches_trl_formula_on_random_groups():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(6 * 5, generator=gen, dtype=torch.float64)
    adv, _ = group_advantages(rewards, 5, "group")
    grouped = rewards.view(6, 5)
    want = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv, want.reshape(-1), atol=1e-12)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, "median")
