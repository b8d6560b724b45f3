"""GRPOLossOptions: one definition of every loss option, accepted the same way by ``grpo_loss``,
``linear_grpo_loss`` and the spec, and built in one call from a training stage's config."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing

import pytest
import torch

from geovlm.config import StageConfig, describe_options, load_config
from geovlm.kernels import GRPOLossOptions, grpo_loss, linear_grpo_loss
from geovlm.kernels import reference as ref
from geovlm.kernels.options import DEFAULT_OPTIONS, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES

B, L, V, H = 3, 7, 53, 16


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 3
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) < 0.8).long()
    logp = torch.randn(B, L, generator=g) - 3
    return dict(hidden=hidden, weight=weight, logits=torch.randn(B, L + 1, V, generator=g),
                ids=ids, mask=mask, adv=torch.randn(B, generator=g),
                old=logp + 0.2 * torch.randn(B, L, generator=g),
                ref=logp + 0.2 * torch.randn(B, L, generator=g))


def test_defaults_are_liger_triton_grpo_loss_defaults():
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    theirs = inspect.signature(liger.triton_grpo_loss).parameters
    for field in dataclasses.fields(GRPOLossOptions):
        assert theirs[field.name].default == getattr(DEFAULT_OPTIONS, field.name), field.name


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level must be one of"),
        (dict(temperature=0.0), "temperature must be a positive"),
        (dict(sapo_temperature_neg=-1.0), "sapo_temperature_neg must be a positive"),
        (dict(beta=float("nan")), "beta must be a finite"),
        (dict(eps_high="0.2"), "eps_high must be a finite"),
        (dict(delta=0.0), "delta must be None or a positive"),
        (dict(max_completion_length=0), "max_completion_length must be None or a positive int"),
        (dict(max_completion_length=True), "max_completion_length must be None or a positive int"),
        (dict(use_bias_correction_kl=1), "use_bias_correction_kl must be a bool"),
        (dict(epsilon=0.2), "unknown GRPO loss option"),
    ],
)
def test_bad_options_are_refused_with_the_field_named(changes, match):
    with pytest.raises(ValueError, match=match):
        DEFAULT_OPTIONS.replace(**changes)


def test_options_are_frozen_and_know_their_normaliser():
    opts = GRPOLossOptions(loss_type="cispo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.beta = 0.0
    assert [t for t in LOSS_TYPES if GRPOLossOptions(loss_type=t).normalises_by_batch_tokens] == [
        "dapo", "cispo", "vespo"
    ]
    assert GRPOLossOptions.from_mapping({"beta": 0.0}) == GRPOLossOptions(beta=0.0)


def test_options_object_and_loose_keywords_give_the_same_loss():
    x = _inputs()
    loose = dict(temperature=0.7, beta=0.05, eps_low=0.1, eps_high=0.3, loss_type="grpo",
                 importance_sampling_level="sequence", use_bias_correction_kl=True, delta=1.4)
    opts = GRPOLossOptions(**loose)
    results = []
    for kwargs in (loose, dict(options=opts)):
        by_logits, _ = grpo_loss(x["logits"], x["old"], x["ref"], x["ids"], x["adv"], x["mask"],
                                 reduce=True, backend="torch", **kwargs)
        by_hidden, _ = linear_grpo_loss(x["hidden"], x["weight"], x["ids"], x["adv"],
                                        old_logp=x["old"], ref_logp=x["ref"],
                                        completion_mask=x["mask"], backend="torch", **kwargs)
        spec, _ = ref.grpo_loss_from_logps(x["old"] - 0.1, x["old"], x["ref"], x["adv"],
                                           x["mask"], **kwargs)
        results.append((by_logits, by_hidden, spec))
    for a, b in zip(*results, strict=True):
        assert a.item() == b.item()
    # Not a default loss: the options were used.
    default, _ = grpo_loss(x["logits"], x["old"], x["ref"], x["ids"], x["adv"], x["mask"],
                           reduce=True, backend="torch")
    assert default.item() != results[0][0].item()


def test_options_and_loose_keywords_together_are_refused():
    x = _inputs(1)
    opts = GRPOLossOptions(loss_type="bnpo")
    with pytest.raises(ValueError, match=r"not both; got options= and \['beta'\]"):
        grpo_loss(x["logits"], x["old"], x["ref"], x["ids"], x["adv"], x["mask"], beta=0.1,
                  options=opts)
    with pytest.raises(ValueError, match=r"not both; got options= and \['loss_type'\]"):
        linear_grpo_loss(x["hidden"], x["weight"], x["ids"], x["adv"], ref_logp=x["ref"],
                         options=opts, loss_type="grpo")
    with pytest.raises(ValueError, match="unknown GRPO loss option"):
        linear_grpo_loss(x["hidden"], x["weight"], x["ids"], x["adv"], ref_logp=x["ref"],
                         epsilon_high=0.3)
    with pytest.raises(TypeError, match="GRPOLossOptions"):
        grpo_loss(x["logits"], x["old"], x["ref"], x["ids"], x["adv"], options={"beta": 0.1})


def test_stage_config_builds_the_options_in_one_call():
    stage = load_config(None, [
        "stages=[{name: g, kind: grpo, temperature: 0.8, beta: 0.0, epsilon_low: 0.1, "
        "epsilon_high: 0.25, loss_type: dr_grpo, importance_sampling_level: sequence, "
        "max_new_tokens: 48, delta: 1.5, use_bias_correction_kl: true}]",
    ]).stages[0]
    assert stage.loss_options() == GRPOLossOptions(
        temperature=0.8, beta=0.0, eps_low=0.1, eps_high=0.25, loss_type="dr_grpo",
        importance_sampling_level="sequence", max_completion_length=48, delta=1.5,
        use_bias_correction_kl=True,
    )


def test_stage_config_choices_come_from_the_options_module():
    hints = typing.get_type_hints(StageConfig)
    assert typing.get_args(hints["loss_type"]) == LOSS_TYPES
    assert typing.get_args(hints["importance_sampling_level"]) == IMPORTANCE_SAMPLING_LEVELS
    assert "one of " + " | ".join(LOSS_TYPES) in describe_options()  # what --help prints
    with pytest.raises(ValueError, match="loss_type: 'ppo' is not one of"):
        load_config(None, ["stages.sft.loss_type=ppo"])


def test_the_config_imports_the_options_without_torch_or_triton():
    code = ("import sys, geovlm.config; "
            "print(sorted(m for m in ('torch', 'triton', 'geovlm.kernels.logprobs') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
