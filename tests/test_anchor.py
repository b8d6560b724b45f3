"""geovlm.anchor: the SFT anchor of a GRPO stage.

Oracle for the loss: the next-token cross-entropy of the collated SFT batch under plain HF's own
forward (every position's logits, no project helper), summed over the labelled tokens and
divided by their count, times the weight; its gradient by autograd through that forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geovlm.anchor import SFTAnchor, anchor_samples, anchored_tasks
from geovlm.config import ConfigError, RunConfig, StageConfig, check, load_config
from geovlm.data.collate import collate_sft
from geovlm.data.schema import Sample, Target
from geovlm.loop import StageContext
from geovlm.runtime import Runtime
from tests.test_model import make_sample, tiny_policy


def _sample(task: str, index: int) -> Sample:
    target = Target(task=task, answer="yes", image_size=(112, 112), label="yes")
    return Sample(id=f"{task}-{index}", task=task, images=[], prompt="Q?", target=target)


TRAIN = [_sample(task, i) for task in ("vqa", "change_det", "referred_det") for i in range(3)]


def _stage(**fields) -> StageConfig:
    return StageConfig(name="grpo_x", kind="grpo", **fields)


def test_the_anchor_keeps_the_tasks_the_stage_does_not_train():
    stage = _stage(tasks=["referred_det"], anchor_weight=0.2)
    run_tasks = ["vqa", "change_det", "referred_det"]
    assert anchored_tasks(stage, stage.tasks, run_tasks) == ["vqa", "change_det"]
    got = anchor_samples(TRAIN, stage, ["vqa", "change_det"])
    assert {s.task for s in got} == {"vqa", "change_det"} and len(got) == 6
    named = _stage(tasks=["referred_det"], anchor_weight=0.2, anchor_tasks=["vqa"])
    assert anchored_tasks(named, named.tasks, run_tasks) == ["vqa"]
    off = _stage(tasks=["vqa"])  # weight 0
    assert anchored_tasks(off, off.tasks, run_tasks) == []
    assert anchor_samples(TRAIN, off, []) == []


def test_an_anchor_without_samples_is_a_clear_error():
    stage = _stage(tasks=None, anchor_weight=0.2)  # the stage trains every task
    kept = anchored_tasks(stage, ["vqa", "change_det", "referred_det"], ["vqa", "referred_det"])
    assert kept == []
    with pytest.raises(ValueError, match="anchor_weight 0.2 but no training samples"):
        anchor_samples(TRAIN, stage, kept)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.grpo_det.anchor_weight=-0.1"], "anchor_weight must be >= 0"),
        (["stages.sft.anchor_weight=0.1"], "is a GRPO stage's"),
        (
            ["stages.grpo_det.anchor_weight=0.1", "stages.grpo_det.anchor_batch_size=0"],
            "anchor_batch_size must be >= 1",
        ),
        (
            ["stages.grpo_det.anchor_weight=0.1", "stages.grpo_det.anchor_tasks=[referred_det]"],
            "trained by the stage itself",
        ),
        (["stages.grpo_det.anchor_tasks=[vqa, not_a_task]"], "unknown task"),
    ],
)
def test_config_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(load_config(None, overrides))


def _context(weight: float, batch_size: int, rank: int = 0, world: int = 1) -> StageContext:
    runtime = Runtime(rank, world, rank, torch.device("cpu"), 1)
    stage = _stage(
        tasks=["referred_det"], anchor_weight=weight, anchor_batch_size=batch_size, max_length=512
    )
    return StageContext(RunConfig(), stage, 1, runtime)


@pytest.fixture(scope="module")
def policy():
    model, processor = tiny_policy(seed=2)
    return model.double(), processor


def _oracle(model, batch: dict, weight: float) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].double()
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
        reduction="sum",
    )
    return weight * nll / (targets != -100).sum()


def test_the_anchor_loss_and_its_gradient_are_the_weighted_sft_loss(policy):
    model, processor = policy
    model.train()
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, i, sizes) for i, sizes in
               enumerate([((112, 112),), ((112, 112), (84, 140)), ((140, 112),), ((112, 112),)])]
    ctx = _context(weight=0.3, batch_size=3)
    anchor = SFTAnchor(samples, processor, ctx, uses_fused_linear=False, shards_parameters=False)
    drawn = anchor.step_samples(5)
    assert len(drawn) == 3
    loss, per_token = anchor.loss(model, 5)
    want = _oracle(model, collate_sft(drawn, processor, 512, cache=None), 0.3)
    # The project's NLL takes the logits to float32 (as the SFT stage does): float32 rounding.
    assert abs(loss.item() - want.item()) < 1e-6 * want.item()
    assert abs(per_token - want.item() / 0.3) < 1e-6 * want.item()
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    expected = torch.autograd.grad(want, params, allow_unused=True)
    compared = 0
    for a, b in zip(got, expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
            compared += 1
    assert compared > 10


def test_each_step_draws_its_own_samples_and_ranks_split_them():
    samples = [_sample("vqa", i) for i in range(8)]
    single = SFTAnchor(samples, _ProcessorStub(), _context(0.1, 4), False, False)
    first, again = single.step_samples(0), single.step_samples(0)
    assert [s.id for s in first] == [s.id for s in again]  # a pure function of the step
    epoch = [s.id for step in (0, 1) for s in single.step_samples(step)]
    assert sorted(epoch) == sorted(s.id for s in samples)  # two steps: one pass, no repeats
    ranks = [
        SFTAnchor(samples, _ProcessorStub(), _context(0.1, 4, rank, 2), False, False)
        for rank in (0, 1)
    ]
    split = [s.id for anchor in ranks for s in anchor.step_samples(0)]
    assert split == [s.id for s in first]
    with pytest.raises(ValueError, match="multiple of the world size 2"):
        SFTAnchor(samples, _ProcessorStub(), _context(0.1, 3, 0, 2), False, False)


class _ProcessorStub:
    """What ``SFTAnchor`` reads of a processor before a loss is asked for: the pad id."""

    class tokenizer:  # noqa: N801 (mimics the attribute)
        pad_token_id = 0
