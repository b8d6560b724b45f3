"""Data parallelism on CPU (gloo): 2-process runs equal 1-process runs with the same global batch.

One ``torchrun --nproc_per_node 2`` launch (tests/_distributed_worker.py) runs SFT and GRPO under
DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, SFT under ZeRO-2 with the optimizer offloaded to the CPU
(DeepSpeed's CPU Adam, built from the JSON's optimizer section and by geovlm without one), GRPO
under a DeepSpeed JSON schedule, GRPO with LoRA adapters under FSDP2, plus interrupted-and-resumed
sharded runs; the single-process baselines run in this process. All start from one saved tiny
model.

What must be equal, and why it can be:
- SFT: every step's loss, gradient norm and token count. Rank r trains on its contiguous half of
  the global batch, the loss is normalised by the global token count and gradients are averaged
  over ranks, so the update is the one of the global batch.
- GRPO: with each prompt's group sampled from its own seeded generator (the worker's probe), the
  completions are a function of the prompt and the weights only, so the rewards, the advantages
  (scaled by the std of the whole batch, the one statistic that spans ranks), the DAPO loss
  (normalised by the global token count), the gradient, the KL to the (sharded) reference and
  every reduced metric must equal the single-process ones.

Tolerance: the two runs add the same float32 numbers in a different order (per-rank partial
sums, then the all-reduce; padding to a different batch width). That gives relative differences of
~1e-6 in step 0; AdamW's first steps are close to sign(gradient) x lr, which does not amplify
them, so after three steps differences stay far below 1e-4 (observed: < 1e-5). A wrong batch
shard, normalisation or reduction shows up as an O(1) relative difference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from geovlm.config import ConfigError, load_config
from geovlm.distributed import deepspeed_config, offloads_optimizer
from geovlm.runtime import gather_rows, reduce_metrics
from geovlm.train import main as train_main
from tests._distributed_worker import install_probes
from tests.test_train import TINY as TRAIN_TINY

ROOT = Path(__file__).resolve().parents[1]
# The tiny model and data of the trainer tests; stages are given per test.
TINY = [o for o in TRAIN_TINY if not o.startswith("stages=")]
SFT = (
    "stages=[{{name: sft, kind: sft, steps: 3, batch_size: 4, grad_accum: 2, lr: 0.01,"
    " warmup_ratio: 0.0, save_every: {save}}}]"
)
GRPO = (
    "stages=[{{name: grpo, kind: grpo, steps: 3, batch_size: 2, num_generations: 3,"
    " max_new_tokens: 8, num_iterations: 2, lr: 0.01, warmup_ratio: 0.0, beta: 0.04,"
    " scale_rewards: batch, save_every: {save}}}]"
)
STRATEGIES = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp2": ["distributed.strategy=fsdp2"],
    "zero2": ["distributed.strategy=deepspeed", "distributed.deepspeed=deepspeed_zero2.json"],
    "zero3": ["distributed.strategy=deepspeed", "distributed.deepspeed=deepspeed_zero3.json"],
}
FIXTURES = ROOT / "tests" / "fixtures"
# DeepSpeed JSONs beyond the shipped ZeRO-2/3 ones. ZeRO-Offload: the packaged JSON's optimizer
# section ("auto" values) makes DeepSpeed build its CPU Adam; without the section geovlm builds
# it. The cosine JSON owns the schedule (its lr sequence is checked against DeepSpeed's class).
JSONS = {
    "zero2_offload": "deepspeed_zero2_offload.json",
    "zero2_offload_stage_adam": str(FIXTURES / "deepspeed_zero2_offload_stage_adam.json"),
    "zero2_cosine": str(FIXTURES / "deepspeed_zero2_cosine.json"),
}
OPTIONS = {
    **STRATEGIES,
    **{
        name: ["distributed.strategy=deepspeed", f"distributed.deepspeed={json_file}"]
        for name, json_file in JSONS.items()
    },
}
OFFLOAD = ("zero2_offload", "zero2_offload_stage_adam")
# The cosine schedule's warm-up: round(0.67 x 3 steps) = 2 steps.
COSINE_WARMUP = "stages.grpo.warmup_ratio=0.67"
# LoRA adapters (geovlm.lora): their checkpoints gathered from FSDP2 shards and loaded back.
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0"]
# Sharded runs interrupted in step 2 (after checkpoint-2 with mu = 2 iterations), then resumed.
RESUMED = [("sft", "fsdp2"), ("sft", "zero3"), ("grpo", "zero2")]
RTOL = 1e-4
# Strategies whose GRPO loss may take the fused linear kernel (parameters not sharded).
FUSED = ("ddp", "zero2")
# The held-out evaluation after a sharded GRPO stage (train.py reloads the full model for it):
# every rank generates its share of the samples without collectives, so none may hang.
SHARDED_EVAL = ("grpo_fsdp2", "grpo_zero2", "grpo_zero3")
EVAL = ["eval.enabled=true", "eval.max_new_tokens=8", "eval.batch_size=2"]
SFT_KEYS = ("step", "loss", "grad_norm", "tokens", "lr")
GRPO_KEYS = (
    "step", "loss", "grad_norm", "kl", "reward", "reward_std", "reward/probe",
    "reward/probe_std", "reward/format", "zero_std_frac", "completion_length",
    "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max",
)


def argv(tmp: Path, init: Path, name: str, stage: str, strategy: str | None, save: int = 0):
    stages = (SFT if stage == "sft" else GRPO).format(save=save)
    extra = OPTIONS[strategy] if strategy else []
    return [f"output_dir={tmp}", f"name={name}", f"model.path={init}", *TINY, stages, *extra]


def metrics(tmp: Path, name: str) -> list[dict]:
    path = tmp / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run's directory: 1-process baselines here, 2-process ones in one torchrun launch."""
    tmp = tmp_path_factory.mktemp("dist")
    assert train_main([f"output_dir={tmp}", "name=init", *TINY, "stages=[]"]) == 0
    init = tmp / "init" / "init"
    spec = []
    for stage in ("sft", "grpo"):
        for strategy in STRATEGIES:
            name = f"{stage}_{strategy}"
            extra = EVAL if name in SHARDED_EVAL else []
            spec.append({"argv": argv(tmp, init, name, stage, strategy) + extra})
    # The fused linear loss (CPU: its chunked torch path) under data parallelism.
    for strategy in FUSED:
        fused = argv(tmp, init, f"grpo_{strategy}_fused", "grpo", strategy)
        spec.append({"argv": fused + ["model.fused_linear_loss=on"]})
    for strategy in OFFLOAD:
        spec.append({"argv": argv(tmp, init, f"sft_{strategy}", "sft", strategy)})
    for stage, strategy in RESUMED:
        name = f"{stage}_{strategy}_resumed"
        # The crash hits the first optimizer step of step 2 (SFT: 1 per step; GRPO: mu = 2).
        crash = 3 if stage == "sft" else 5
        spec.append({"argv": argv(tmp, init, name, stage, strategy, save=1), "crash_after": crash})
    # The JSON's schedule, and LoRA under FSDP2, interrupted and resumed like the runs above.
    cosine = argv(tmp, init, "grpo_zero2_cosine_resumed", "grpo", "zero2_cosine", save=1)
    spec.append({"argv": [*cosine, COSINE_WARMUP], "crash_after": 5})
    lora = argv(tmp, init, "grpo_lora_fsdp2_resumed", "grpo", "fsdp2", save=1)
    spec.append({"argv": [*lora, *LORA], "crash_after": 5})
    collectives, optimizers = tmp / "collectives.json", tmp / "optimizers.json"
    (tmp / "spec.json").write_text(json.dumps(
        {"collectives": str(collectives), "optimizers": str(optimizers), "runs": spec}
    ))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--standalone", "--module", "tests._distributed_worker"]
    # DeepSpeed's CPU Adam is a C++ op built on first use (minutes, once per machine): build it
    # here so that the launch's timeout measures the runs.
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)
    worker = subprocess.Popen(
        [*launcher, str(tmp / "spec.json")], cwd=tmp, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # The single-process baselines run meanwhile (the launch spends seconds importing).
    with ExitStack() as probes:
        install_probes(probes)
        for stage in ("sft", "grpo"):
            assert train_main(argv(tmp, init, f"{stage}_single", stage, None)) == 0
        assert train_main([*argv(tmp, init, "grpo_lora_single", "grpo", None), *LORA]) == 0
    try:
        # A deadlock guard, generous enough for a machine shared with other jobs.
        output, _ = worker.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        worker.kill()
        output, _ = worker.communicate()
        pytest.fail(f"torchrun timed out (a collective deadlocked?):\n{output[-4000:]}")
    assert worker.returncode == 0, output[-6000:]
    return tmp


def assert_same(got: list[dict], want: list[dict], keys) -> None:
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        for key in keys:
            assert key in w, key
            assert g[key] == pytest.approx(w[key], rel=RTOL, abs=1e-7), (key, g, w)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sft_two_processes_match_one(runs, strategy):
    want = metrics(runs, "sft_single")
    assert_same(metrics(runs, f"sft_{strategy}"), want, SFT_KEYS)
    assert len({r["loss"] for r in want}) == 3  # the steps really train


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_grpo_two_processes_match_one(runs, strategy):
    want = metrics(runs, "grpo_single")
    assert_same(metrics(runs, f"grpo_{strategy}"), want, GRPO_KEYS)
    # Non-trivial: the probe reward varies, so the loss and the KL to the reference move, and
    # completions end early, so the ranks hold different token counts (which the DAPO loss and
    # the token-mean metrics must weigh).
    assert all(r["reward_std"] > 0 and r["grad_norm"] > 0 for r in want)
    assert want[-1]["kl"] > 0
    assert all(2 < r["completion_length"] < 8 for r in want)


@pytest.mark.parametrize("strategy", FUSED)
def test_fused_linear_loss_under_data_parallelism_matches_one_process(runs, strategy):
    """Hidden states via the wrapper's forward + lm_head.weight: the logits path's step."""
    assert_same(metrics(runs, f"grpo_{strategy}_fused"), metrics(runs, "grpo_single"), GRPO_KEYS)


@pytest.mark.parametrize("strategy", OFFLOAD)
def test_zero_offload_with_cpu_adam_matches_one_process(runs, strategy):
    """ZeRO-2 with the optimizer state and step on the CPU (DeepSpeedCPUAdam): the AdamW update
    of the global batch, as in one process with torch's AdamW."""
    assert_same(metrics(runs, f"sft_{strategy}"), metrics(runs, "sft_single"), SFT_KEYS)
    optimizers = json.loads((runs / "optimizers.json").read_text())
    assert optimizers[f"sft_{strategy}"] == "DeepSpeedCPUAdam"
    assert optimizers["sft_zero2"] == "AdamW"  # no offload: the stage's torch AdamW


def test_a_deepspeed_json_schedule_steps_once_per_stage_step_and_resumes(runs):
    """DeepSpeed's WarmupCosineLR from the JSON, its "auto" values filled by the stage (lr 0.01,
    3 steps, warm-up 2, final ratio min_lr_ratio 0.1), advanced once per GRPO step although each
    step makes mu = 2 updates, and restored by the resume in step 2."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    schedule = WarmupCosineLR(
        optimizer, total_num_steps=3, warmup_num_steps=2, cos_min_ratio=0.1,
        warmup_min_ratio=0.5, warmup_type="linear",
    )
    want = []
    for _ in range(3):
        want.append(schedule.get_last_lr()[0])
        schedule.step()
    got = [r["lr"] for r in metrics(runs, "grpo_zero2_cosine_resumed")]
    assert got == pytest.approx(want, abs=1e-12)
    assert len(set(want)) == 3


def test_lora_adapters_under_fsdp2_resume_and_match_one_process(runs):
    """Adapters only train, their state is gathered from the shards into PEFT-format
    checkpoints, loaded back into the shards on resume, and the run is the one-process run."""
    from safetensors.torch import load_file

    want = metrics(runs, "grpo_lora_single")
    assert_same(metrics(runs, "grpo_lora_fsdp2_resumed"), want, GRPO_KEYS)
    assert want[-1]["kl"] > 0
    stage_dir = runs / "grpo_lora_fsdp2_resumed" / "stages" / "0-grpo"
    assert not (stage_dir / "final" / "model.safetensors").exists()
    got = load_file(stage_dir / "final" / "adapter_model.safetensors")
    single = load_file(runs / "grpo_lora_single" / "stages" / "0-grpo" / "final"
                       / "adapter_model.safetensors")
    assert got.keys() == single.keys() and len(got) > 0
    for key, value in single.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", SHARDED_EVAL)
def test_evaluation_after_a_sharded_stage(runs, name):
    report = json.loads((runs / name / "stages" / "0-grpo" / "eval" / "metrics.json").read_text())
    assert set(report["summary"]) == {"scene_cls", "counting", "referred_det"}
    assert (runs / name / "init_eval" / "metrics.json").is_file()


@pytest.mark.parametrize("stage, strategy", RESUMED)
def test_sharded_run_resumes_and_loads_in_one_process(runs, stage, strategy):
    name = f"{stage}_{strategy}_resumed"
    want = metrics(runs, f"{stage}_{strategy}")
    assert_same(metrics(runs, name), want, SFT_KEYS if stage == "sft" else GRPO_KEYS)
    from transformers import AutoModelForImageTextToText

    stage_dir = runs / name / "stages" / f"0-{stage}"
    final = AutoModelForImageTextToText.from_pretrained(stage_dir / "final")
    straight = AutoModelForImageTextToText.from_pretrained(
        runs / f"{stage}_{strategy}" / "stages" / f"0-{stage}" / "final"
    )
    for (key, a), (_, b) in zip(
        final.state_dict().items(), straight.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=key)
    assert (stage_dir / "checkpoint-2").is_dir()


def test_fsdp2_checkpoint_resumes_in_one_process(runs):
    """The name-keyed full optimizer state of an FSDP2 checkpoint loads in a plain process."""
    import shutil

    name = "sft_from_fsdp2"
    source = runs / "sft_fsdp2_resumed" / "stages" / "0-sft" / "checkpoint-2"
    target = runs / name / "stages" / "0-sft" / "checkpoint-2"
    shutil.copytree(source, target)
    # The run folder's config says which run the checkpoint belongs to (geovlm.rundir).
    shutil.copy(runs / "sft_fsdp2_resumed" / "config.yaml", runs / name / "config.yaml")
    init = runs / "init" / "init"
    with ExitStack() as probes:
        install_probes(probes)
        assert train_main(argv(runs, init, name, "sft", None, save=1)) == 0
    got = metrics(runs, name)
    want = metrics(runs, "sft_single")[2:]
    assert [r["step"] for r in got] == [2]
    for key in SFT_KEYS:
        assert got[0][key] == pytest.approx(want[0][key], rel=RTOL), key


def test_deepspeed_checkpoint_refuses_another_world_size(runs, tmp_path):
    import shutil

    name = "grpo_from_zero2"
    source = runs / "grpo_zero2_resumed" / "stages" / "0-grpo" / "checkpoint-2"
    shutil.copytree(source, tmp_path / name / "stages" / "0-grpo" / "checkpoint-2")
    shutil.copy(runs / "grpo_zero2_resumed" / "config.yaml", tmp_path / name / "config.yaml")
    init = runs / "init" / "init"
    with pytest.raises(RuntimeError, match="ZeRO optimizer partitions"):
        train_main(argv(tmp_path, init, name, "grpo", None, save=1))


def test_shipped_deepspeed_configs_resolve_auto_values():
    config = load_config(None, ["stages.sft.batch_size=8", "stages.sft.grad_accum=3"])
    stage = config.stages[0]
    for name, zero in (("deepspeed_zero2.json", 2), ("deepspeed_zero3.json", 3)):
        ds = deepspeed_config(name, stage, world=2, dtype=torch.bfloat16, hidden_size=64)
        assert ds["zero_optimization"]["stage"] == zero
        assert ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == 3
        assert ds["train_batch_size"] == 24
        assert ds["gradient_clipping"] == stage.max_grad_norm
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
        assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
        assert "auto" not in json.dumps(ds)
    grpo = load_config(None, ["stages.sft.kind=grpo", "stages.sft.grad_accum=3"]).stages[0]
    ds = deepspeed_config("deepspeed_zero2.json", grpo, world=2)
    assert ds["gradient_accumulation_steps"] == 1


def test_an_optimizer_and_a_schedule_from_the_deepspeed_docs_take_the_stage_values(tmp_path):
    """The JSON owns the optimizer and schedule types; "auto" and unset stage values are filled
    (HF Trainer's convention), explicit values the stage does not have stay the JSON's."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "Adam", "params": {"lr": "auto", "betas": [0.8, 0.999],
                                                 "eps": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto",
                                                          "warmup_num_steps": "auto"}},
    }))
    overrides = ["stages.sft.steps=40", "stages.sft.lr=3e-5", "stages.sft.warmup_ratio=0.1",
                 "stages.sft.weight_decay=0.01"]
    stage = load_config(None, overrides).stages[0]
    ds = deepspeed_config(str(path), stage, world=2)
    assert ds["optimizer"] == {"type": "Adam", "params": {
        "lr": 3e-5, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 0.01}}
    assert ds["scheduler"]["params"] == {
        "warmup_min_lr": 0.0, "warmup_num_steps": 4, "warmup_max_lr": 3e-5, "total_num_steps": 40}
    cosine = {"zero_optimization": {"stage": 3},
              "scheduler": {"type": "WarmupCosineLR", "params": {}}}
    path.write_text(json.dumps(cosine))
    assert deepspeed_config(str(path), stage, world=2)["scheduler"]["params"] == {
        "warmup_num_steps": 4, "total_num_steps": 40, "cos_min_ratio": stage.min_lr_ratio}


def test_shipped_offload_configs_resolve():
    stage = load_config(None, ["stages.sft.batch_size=8"]).stages[0]
    for name in ("deepspeed_zero2_offload.json", "deepspeed_zero3_offload.json"):
        ds = deepspeed_config(name, stage, world=4, dtype=torch.bfloat16, hidden_size=64)
        assert offloads_optimizer(ds)
        assert ds["optimizer"]["params"] == {"lr": stage.lr, "betas": [0.9, 0.99], "eps": 1e-8,
                                             "weight_decay": stage.weight_decay}
        assert "auto" not in json.dumps(ds)
    assert not offloads_optimizer(deepspeed_config("deepspeed_zero3.json", stage, world=4))


@pytest.mark.parametrize(
    "content, message",
    [
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam",
                                                           "params": {"lr": 0.5}}},
         r"lr=0.5 but stages.sft.lr gives 0.003"),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupDecayLR",
                                                           "params": {"total_num_steps": 7}}},
         "stages.sft.steps"),
        ({"zero_optimization": {"stage": 2}, "optimizer": "Adam"}, "params"),
        ({"zero_optimization": {"stage": 0}}, "strategy=ddp"),
        ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3}, "auto"),
        ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, "sub_group_size"),
    ],
)
def test_deepspeed_config_errors_name_the_problem(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    stage = load_config(None, ["stages.sft.batch_size=8"]).stages[0]
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(str(path), stage, world=2)
    with pytest.raises(ConfigError, match="cannot read"):
        deepspeed_config(str(tmp_path / "missing.json"), stage, world=2)


def test_collectives_reduce_over_two_ranks(runs):
    got = json.loads((runs / "collectives.json").read_text())
    reduced = got["reduced"]
    assert reduced["kl"] == pytest.approx((0.1 * 3 + 0.3 * 1) / 4)  # token-weighted mean
    assert reduced["loss"] == pytest.approx(1.5)
    assert reduced["clip_ratio/low_min"] == 0.2  # NaN on one rank does not win
    assert math.isnan(reduced["clip_ratio/high_max"])  # NaN on every rank stays NaN
    assert got["total"] == [0.0, 10.0, 11.0] and got["a"] == [0, 0, 1, 1]


def test_collectives_are_identities_in_one_process():
    values = {"loss": 0.5, "clip_ratio/low_min": float("nan")}
    out = reduce_metrics(values, {"loss": 3.0})
    assert out["loss"] == 0.5 and out["clip_ratio/low_min"] != out["clip_ratio/low_min"]
    tree = ([1.0, 2.0], {"a": [3.0]})
    assert gather_rows(tree) is tree
