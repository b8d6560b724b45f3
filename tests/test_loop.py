"""Data order, schedule and metrics-log plumbing shared by the stages."""

import math

import torch

from geovlm.config import StageConfig
from geovlm.loop import MetricsLog, batch_indices
from geovlm.optim import make_optimizer, make_scheduler


def test_batches_cover_each_epoch_exactly_once():
    n, size = 23, 5
    stream = [i for step in range(46) for i in batch_indices(n, size, step, seed=3)]
    # 46 steps * 5 = 230 = 10 epochs of 23: every epoch is a permutation.
    for epoch in range(10):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))


def test_batches_are_a_pure_function_of_step_and_seed():
    assert batch_indices(50, 7, 12, seed=1) == batch_indices(50, 7, 12, seed=1)
    assert batch_indices(50, 7, 12, seed=1) != batch_indices(50, 7, 12, seed=2)


def test_schedule_matches_warmup_cosine_formula():
    stage = StageConfig(steps=20, lr=2.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    param = torch.nn.Parameter(torch.zeros(2, 2))
    model = torch.nn.Linear(1, 1)
    model.weight = param
    opt = make_optimizer(model, stage)
    sched = make_scheduler(opt, stage)
    got = []
    for _ in range(20):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    warmup = 2
    for step, lr in enumerate(got):
        if step < warmup:
            want = 2.0 * (step + 1) / warmup
        else:
            progress = (step - warmup) / (20 - warmup)
            want = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert abs(lr - want) < 1e-12, (step, lr, want)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, StageConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight)}


def test_metrics_log_truncates_one_stage_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(5):
        log.write({"stage": "sft", "step": step, "loss": float(step)})
    log.write({"stage": "other", "step": 9})
    log.truncate("sft", keep_through_step=2)
    records = log.records()
    assert [r["step"] for r in records if r["stage"] == "sft"] == [0, 1, 2]
    assert any(r["stage"] == "other" for r in records)
