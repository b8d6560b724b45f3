"""End to end on the tiny model: SFT learns, resume is exact, SFT -> GRPO stages chain."""

import json

import pytest
import torch

from geovlm.config import load_config
from geovlm.distributed import Engine
from geovlm.train import run

# The smallest tiny model the end-to-end tests train (shared with the other end-to-end tests).
TINY_MODEL = [
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_hidden_layers=1",
    "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1",
    "model.tiny.vision_hidden_size=32",
    "model.tiny.vision_intermediate_size=32",
    "model.tiny.vision_depth=1",
    "model.tiny.vocab_size=400",
    # The preset's tower pretraining and freezing are tested in tests/test_vision_pretrain.py.
    "model.vision_pretrain.steps=0",
    "model.freeze_vision=false",
]

TINY = [
    *TINY_MODEL,
    "data.n_train_scenes=4",
    "data.n_val_scenes=1",
    "data.n_test_scenes=1",
    "data.n_test_scenes_by_task={}",
    "data.tasks=[scene_cls, counting, referred_det]",
    "eval.enabled=false",
    "threads=1",
    "stages=[{name: sft, kind: sft}]",
]


def config_for(tmp_path, name, *extra):
    return load_config(None, [f"output_dir={tmp_path}", f"name={name}", *TINY, *extra])


def records(config, kind=None):
    path = config.run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


class Crash(RuntimeError):
    pass


def crash_on_call(monkeypatch, n):
    """Make the n-th optimizer step raise, as if the process were killed there."""
    calls = {"n": 0}
    original = Engine.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"killed at optimizer step {n}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "step", step)


def test_sft_steps_reduce_the_loss(tmp_path):
    config = config_for(
        tmp_path, "learn", "stages.sft.steps=12", "stages.sft.batch_size=12",
        "stages.sft.lr=0.01", "stages.sft.warmup_ratio=0.0", "stages.sft.save_every=0",
    )
    run(config)
    losses = [r["loss"] for r in records(config, "sft")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    final = config.run_dir / "stages" / "0-sft" / "final"
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(final)
    assert sum(p.numel() for p in reloaded.parameters()) > 0


def test_sft_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    common = ("stages.sft.steps=5", "stages.sft.batch_size=4", "stages.sft.save_every=2")
    straight = config_for(tmp_path, "straight", *common)
    run(straight)
    resumed = config_for(tmp_path, "resumed", *common)
    crash_on_call(monkeypatch, 4)  # dies in step 3 (0-based), after checkpoint-2
    with pytest.raises(Crash):
        run(resumed)
    monkeypatch.undo()
    assert (resumed.run_dir / "stages" / "0-sft" / "checkpoint-2").is_dir()
    run(resumed)
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in records(straight, "sft")]
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in records(resumed, "sft")]
    assert got == want
    a = torch.load(straight.run_dir / "stages/0-sft/final/trainer_state.pt", weights_only=False)
    assert a["step"] == 5


def test_sft_then_grpo_stages_chain_and_resume_exactly(tmp_path, monkeypatch):
    """Two GRPO stages after SFT, the first with an SFT anchor; a crash mid-stage resumes to
    the same metrics."""
    stages = (
        "stages=[{name: sft, kind: sft, steps: 2, batch_size: 4, save_every: 0},"
        " {name: grpo_a, kind: grpo, tasks: [scene_cls, counting], steps: 3, batch_size: 2,"
        "  num_generations: 3, max_new_tokens: 6, save_every: 1, beta: 0.04,"
        "  anchor_weight: 0.5, anchor_batch_size: 2},"
        " {name: grpo_b, kind: grpo, tasks: [referred_det], steps: 1, batch_size: 2,"
        "  num_generations: 2, max_new_tokens: 6, beta: 0.0, loss_type: grpo}]"
    )
    # The resumed run prepares its batches (SFT windows, GRPO prompts) in a background worker,
    # the straight one inline: both must give the same steps.
    straight = config_for(tmp_path, "straight", stages, "data.workers=0")
    run(straight)
    resumed = config_for(tmp_path, "resumed", stages, "data.workers=1")
    crash_on_call(monkeypatch, 2 + 2)  # SFT takes 2 steps; die in GRPO's step 1
    with pytest.raises(Crash):
        run(resumed)
    monkeypatch.undo()
    run(resumed)
    keys = ("stage", "step", "loss", "reward", "kl")
    want = [tuple(r.get(k) for k in keys) for r in records(straight, "grpo")]
    got = [tuple(r.get(k) for k in keys) for r in records(resumed, "grpo")]
    assert got == want
    assert [r["stage"] for r in records(straight, "grpo")] == ["grpo_a"] * 3 + ["grpo_b"]
    for r in records(straight, "grpo"):
        assert 0.0 <= r["reward"] <= 2.0 and "zero_std_frac" in r and "completion_length" in r
    assert all("kl" in r for r in records(straight, "grpo") if r["stage"] == "grpo_a")
    # grpo_a's SFT anchor (referred_det, the task it does not train) resumes with its draws.
    assert [("anchor_nll" in r) for r in records(straight, "grpo")] == [True] * 3 + [False]
    want_anchor = [r.get("anchor_nll") for r in records(straight, "grpo")]
    assert [r.get("anchor_nll") for r in records(resumed, "grpo")] == want_anchor
    for name in ("0-sft", "1-grpo_a", "2-grpo_b"):
        assert (straight.run_dir / "stages" / name / "final" / "config.json").is_file()
    assert (straight.run_dir / "training_curves.png").is_file()


def test_a_malformed_data_file_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    from geovlm.train import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "problem": "where?"}\n{not json\n')
    code = main([f"output_dir={tmp_path}", "name=bad", f"data.train={bad}", *TINY,
                 "data.val=null", "data.test=null"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: data:") and "bad.jsonl" in err


def test_sft_with_background_workers_equals_inline(tmp_path):
    common = ("stages.sft.steps=3", "stages.sft.batch_size=4", "stages.sft.save_every=0")
    inline = config_for(tmp_path, "inline", *common, "data.workers=0")
    background = config_for(tmp_path, "background", *common, "data.workers=2")
    run(inline)
    run(background)
    keys = ("step", "loss", "grad_norm", "tokens")
    want = [tuple(r[k] for k in keys) for r in records(inline, "sft")]
    assert [tuple(r[k] for k in keys) for r in records(background, "sft")] == want
