"""Reward options (geovlm/rewards/options.py): one set of defaults, shared with the run config."""

from __future__ import annotations

import dataclasses

import pytest

from geovlm import config
from geovlm.rewards import semantic, text
from geovlm.rewards.options import LEXICAL_METRIC_NAMES, RewardChoices, RewardOptions


def test_the_run_config_reward_section_is_the_rewards_own_dataclass():
    assert config.RewardConfig is RewardChoices
    assert issubclass(RewardOptions, RewardChoices)
    stage = config.StageConfig()
    defaults = {f.name: f.default for f in dataclasses.fields(RewardChoices)}
    assert dataclasses.asdict(stage.rewards) == defaults
    options = RewardOptions()
    assert {name: getattr(options, name) for name in defaults} == defaults


def test_yaml_keys_of_stage_rewards_still_work():
    cfg = config.load_config(
        None,
        [
            "stages.sft.rewards.counting=smooth",
            "stages.0.rewards.semantic_weight=0.25",
            "stages.sft.rewards.use_embeddings=false",
        ],
    )
    rewards = cfg.stages[0].rewards
    assert (rewards.counting, rewards.semantic_weight, rewards.use_embeddings) == (
        "smooth",
        0.25,
        False,
    )
    options = RewardOptions(convention="pixels", **dataclasses.asdict(rewards))
    assert options.counting == "smooth" and options.convention == "pixels"
    with pytest.raises(config.ConfigError, match="stages.0.rewards.counting"):
        config.load_config(None, ["stages.sft.rewards.counting=fuzzy"])
    with pytest.raises(config.ConfigError, match="unknown config key"):
        config.load_config(None, ["stages.sft.rewards.convention=pixels"])
    saved = config.config_from_dict(cfg.to_dict())
    assert saved.stages[0].rewards == rewards


def test_lexical_metric_names_are_the_text_functions():
    assert tuple(semantic.LEXICAL_METRICS) == LEXICAL_METRIC_NAMES
    for name, metric in semantic.LEXICAL_METRICS.items():
        assert metric is getattr(text, name)
    with pytest.raises(ValueError, match="lexical"):
        RewardOptions(lexical="meteor")
