"""``report_to``: metrics, config and held-out tables reach the experiment trackers.

TensorBoard is checked for real: a tiny run (interrupted and resumed) is read back from its event
files with TensorBoard's own ``EventAccumulator`` and compared with ``metrics.jsonl`` and
``summary.json``. W&B, Trackio and MLflow are optional extras: fake modules injected into
``sys.modules`` record the calls, so the mapping of records to their APIs is checked without the
packages; a missing package is a clear error before anything is built.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
import yaml

from geovlm.config import ConfigError, load_config, report_targets
from geovlm.rundir import config_differences
from geovlm.trackers import Trackers, global_step, open_trackers, stage_end_step
from tests.test_train import TINY, Crash, crash_on_call

STAGES = (
    "stages=[{name: sft, kind: sft, steps: 4, batch_size: 4, save_every: 2},"
    " {name: grpo, kind: grpo, tasks: [scene_cls, counting], steps: 2, batch_size: 2,"
    "  num_generations: 2, max_new_tokens: 4, save_every: 0, eval_every: 0}]"
)
EVAL = ["eval.enabled=true", "eval.max_new_tokens=4", "eval.batch_size=4",
        "eval.sampled_reward=false"]


def config_for(tmp_path, name, *extra):
    return load_config(None, [f"output_dir={tmp_path}", f"name={name}", *TINY, *extra])


# --------------------------------------------------------------------------- report_to


@pytest.mark.parametrize(
    "value, want",
    [
        ("none", []),
        ("tensorboard", ["tensorboard"]),
        ("tensorboard, wandb", ["tensorboard", "wandb"]),
        (["mlflow", "trackio", "mlflow"], ["mlflow", "trackio"]),
        ("WandB", ["wandb"]),
        ([], []),
    ],
)
def test_report_to_is_a_name_a_list_or_a_comma_separated_string(value, want):
    assert report_targets(value) == want


@pytest.mark.parametrize("value, message", [("tensorbord", "tensorbord"), ("none,wandb", "none")])
def test_report_to_refuses_unknown_names_and_none_with_others(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"report_to={value}"])


def test_report_to_from_the_command_line_and_yaml_lists():
    assert load_config(None, ["report_to=[wandb, mlflow]"]).report_to == ["wandb", "mlflow"]
    assert load_config(None, []).report_to == "tensorboard"


def test_report_to_does_not_make_a_run_folder_refuse_a_relaunch():
    old = load_config(None, ["report_to=none"]).to_dict()
    new = load_config(None, ["report_to=tensorboard,wandb"]).to_dict()
    assert config_differences(old, new) == []


def test_a_missing_tracker_package_is_named_before_anything_is_built(
    tmp_path, capsys, monkeypatch
):
    from geovlm import trackers
    from geovlm.train import main

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec",
        lambda name, *a: None if name == "wandb" else real(name, *a),
    )
    code = main([f"output_dir={tmp_path}", "name=run", *TINY, "report_to=tensorboard,wandb"])
    assert code == 2
    err = capsys.readouterr().err
    assert "wandb needs pip install 'geovlm[wandb]'" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- steps


def test_global_steps_follow_the_stages_and_only_grow():
    config = load_config(None, [STAGES])
    assert [global_step(config, "sft", s) for s in range(4)] == [1, 2, 3, 4]
    assert [global_step(config, "grpo", s) for s in range(2)] == [5, 6]
    assert [stage_end_step(config, label) for label in ("init", "sft", "grpo")] == [0, 4, 6]


# --------------------------------------------------------------------------- TensorBoard


def read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_tensorboard_holds_every_metric_the_config_and_the_heldout_tables(tmp_path, monkeypatch):
    config = config_for(tmp_path, "tb", STAGES, *EVAL)
    from geovlm.train import run

    # Dies in SFT step 3: steps 0-2 are logged, checkpoint-2 resumes, step 2 is logged again.
    crash_on_call(monkeypatch, 4)
    with pytest.raises(Crash):
        run(config)
    monkeypatch.undo()
    run(config)

    events = read_events(config.run_dir)
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text()
               .splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [
        ("sft", 0), ("sft", 1), ("sft", 2), ("sft", 3), ("grpo", 0), ("grpo", 1)
    ]
    tags = set(events.Tags()["scalars"])
    for record in records:
        for key, value in record.items():
            if key in ("stage", "kind", "step"):
                continue
            tag = f"{record['stage']}/{key}"
            assert tag in tags, tag
            # After the resume, each step is there once, with the resumed run's value.
            points = [e for e in events.Scalars(tag)
                      if e.step == global_step(config, record["stage"], record["step"])]
            assert len(points) == 1, (tag, points)
            assert points[0].value == pytest.approx(value, rel=1e-6, nan_ok=True)
    assert [e.step for e in events.Scalars("sft/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("grpo/reward")] == [5, 6]

    summary = json.loads((config.run_dir / "summary.json").read_text())["held_out"]
    assert list(summary) == ["init", "sft", "grpo"]
    for label, table in summary.items():
        for task, row in table.items():
            for metric, value in row.items():
                points = events.Scalars(f"heldout/{task}/{metric}")
                at = [e.value for e in points if e.step == stage_end_step(config, label)]
                assert at == [pytest.approx(value)], (label, task, metric)

    texts = events.Tensors("heldout/summary/text_summary")
    last = texts[-1].tensor_proto.string_val[0].decode()
    assert texts[-1].step == 6
    assert "| task | metric | blind | init | sft | grpo | trained by |" in last
    assert "scene_cls" in last
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    saved = yaml.safe_load(config_text.removeprefix("```yaml\n").removesuffix("```"))
    assert saved == config.to_dict()


def test_report_to_none_writes_no_tracker_files(tmp_path):
    from geovlm.train import run

    config = config_for(tmp_path, "quiet", "report_to=none", "stages.sft.steps=1")
    run(config)
    assert not (config.run_dir / "tensorboard").exists()
    assert (config.run_dir / "metrics.jsonl").is_file()


# --------------------------------------------------------------------------- fake backends


class Recorder:
    """A fake tracker package: every call is appended to ``calls`` as (name, args, kwargs)."""

    def __init__(self, name: str):
        self.calls: list[tuple] = []
        self.module = types.ModuleType(name)
        self.module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def function(self, name: str, result=None):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return result

        setattr(self.module, name, call)
        return call

    def named(self, name: str) -> list[tuple]:
        return [(args, kwargs) for n, args, kwargs in self.calls if n == name]


class Table:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data

    def __eq__(self, other):
        return (self.columns, self.data) == (other.columns, other.data)


def fake_wandb(monkeypatch) -> Recorder:
    rec = Recorder("wandb")
    run = types.SimpleNamespace(id="run-123")
    run.config = types.SimpleNamespace(update=lambda *a, **k: rec.calls.append(("config", a, k)))
    run.log = lambda *a, **k: rec.calls.append(("log", a, k))
    run.finish = lambda *a, **k: rec.calls.append(("finish", a, k))
    rec.function("init", run)
    rec.module.Table = Table
    monkeypatch.setitem(sys.modules, "wandb", rec.module)
    return rec


def fake_trackio(monkeypatch) -> Recorder:
    rec = Recorder("trackio")
    for name in ("init", "log", "finish"):
        rec.function(name)
    rec.module.Table = Table
    monkeypatch.setitem(sys.modules, "trackio", rec.module)
    return rec


def fake_mlflow(monkeypatch, run_id="abc") -> Recorder:
    rec = Recorder("mlflow")
    run = types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))
    rec.function("start_run", run)
    for name in ("set_experiment", "log_params", "log_metrics", "log_text", "end_run"):
        rec.function(name)
    monkeypatch.setitem(sys.modules, "mlflow", rec.module)
    return rec


RECORDS = [
    {"stage": "sft", "kind": "sft", "step": 0, "loss": 2.5, "lr": 1e-3, "tokens": 7},
    {"stage": "grpo", "kind": "grpo", "step": 1, "reward": 0.25, "reward/format": 1.0,
     "clip_ratio/low_min": float("nan")},
]
SUMMARIES = {"init": {"vqa": {"accuracy": 0.1}}, "sft": {"vqa": {"accuracy": 0.4},
                                                         "counting": {"mae": 2.0}}}
COLUMNS = ["task", "metric", "init", "sft"]
ROWS = [["counting", "mae", None, 2.0], ["vqa", "accuracy", 0.1, 0.4]]


def drive(config) -> None:
    """What a run sends: records, a resume, the held-out table after SFT, the end."""
    trackers = open_trackers(config, is_main=True)
    for record in RECORDS:
        trackers.log_record(record)
    trackers.rewind("grpo", 1)
    trackers.log_heldout("sft", SUMMARIES, "| markdown |")
    trackers.close()


def tracked(tmp_path, report_to):
    config = load_config(None, [f"output_dir={tmp_path}", "name=fake", STAGES,
                                f"report_to={report_to}"])
    config.run_dir.mkdir(parents=True)
    return config


def test_wandb_gets_the_config_every_metric_at_global_steps_and_a_table(tmp_path, monkeypatch):
    rec = fake_wandb(monkeypatch)
    config = tracked(tmp_path, "wandb")
    drive(config)
    (init_args, init_kwargs), = rec.named("init")
    assert init_kwargs["name"] == "fake" and init_kwargs["id"] is None
    assert init_kwargs["resume"] == "allow" and init_kwargs["project"] == "geovlm"
    assert rec.named("config") == [((config.to_dict(),), {"allow_val_change": True})]
    logs = rec.named("log")
    assert logs[0] == (({"sft/loss": 2.5, "sft/lr": 1e-3, "sft/tokens": 7.0},), {"step": 1})
    values, step = logs[1][0][0], logs[1][1]["step"]
    assert step == 6 and values["grpo/reward"] == 0.25 and values["grpo/reward/format"] == 1.0
    assert values["grpo/clip_ratio/low_min"] != values["grpo/clip_ratio/low_min"]  # NaN kept
    assert logs[2] == (({"heldout/vqa/accuracy": 0.4, "heldout/counting/mae": 2.0},), {"step": 4})
    assert logs[3] == (({"heldout/summary": Table(COLUMNS, ROWS)},), {"step": 4})
    assert [name for name, *_ in rec.calls][-1] == "finish"
    # The id is kept: a relaunch continues the same W&B run.
    assert json.loads((config.run_dir / "trackers.json").read_text()) == {"wandb": "run-123"}
    rec.calls.clear()
    open_trackers(config, is_main=True)
    assert rec.named("init")[0][1]["id"] == "run-123"


def test_trackio_gets_the_config_every_metric_and_a_table(tmp_path, monkeypatch):
    rec = fake_trackio(monkeypatch)
    config = tracked(tmp_path, "trackio")
    drive(config)
    (_, init_kwargs), = rec.named("init")
    assert init_kwargs == {"project": "geovlm", "name": "fake", "config": config.to_dict(),
                           "resume": "allow"}
    logs = rec.named("log")
    assert logs[0] == (({"sft/loss": 2.5, "sft/lr": 1e-3, "sft/tokens": 7.0},), {"step": 1})
    assert logs[1][1] == {"step": 6}
    assert logs[3] == (({"heldout/summary": Table(COLUMNS, ROWS)},), {"step": 4})
    assert rec.calls[-1][0] == "finish"


def test_mlflow_gets_params_metrics_without_nan_and_markdown(tmp_path, monkeypatch):
    rec = fake_mlflow(monkeypatch)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    config = tracked(tmp_path, "mlflow")
    drive(config)
    assert rec.named("set_experiment") == [(("geovlm",), {})]
    assert rec.named("start_run") == [((), {"run_name": "fake"})]
    params = {}
    for (batch,), _ in rec.named("log_params"):
        assert len(batch) <= 100
        params.update(batch)
    assert params["stages.0.lr"] == config.stages[0].lr and params["report_to"] == "mlflow"
    assert params["data.tasks"] == str(config.data.tasks)
    metrics = rec.named("log_metrics")
    assert metrics[0] == (({"sft/loss": 2.5, "sft/lr": 1e-3, "sft/tokens": 7.0},), {"step": 1})
    assert metrics[1] == (({"grpo/reward": 0.25, "grpo/reward/format": 1.0},), {"step": 6})
    texts = rec.named("log_text")
    assert yaml.safe_load(texts[0][0][0]) == config.to_dict() and texts[0][0][1] == "config.yaml"
    assert texts[1] == (("| markdown |", "heldout/summary/step_4.md"), {})
    assert rec.calls[-1][0] == "end_run"
    # A relaunch continues the run and does not rewrite its (write-once) params.
    rec.calls.clear()
    open_trackers(config, is_main=True)
    assert rec.named("start_run") == [((), {"run_id": "abc"})]
    assert rec.named("log_params") == []


def test_several_trackers_at_once_and_only_rank_zero(tmp_path, monkeypatch):
    wandb, mlflow = fake_wandb(monkeypatch), fake_mlflow(monkeypatch)
    config = tracked(tmp_path, "wandb,mlflow")
    quiet = open_trackers(config, is_main=False)
    assert isinstance(quiet, Trackers) and quiet.backends == []
    quiet.log_record(RECORDS[0])
    assert wandb.calls == [] and mlflow.calls == []
    drive(config)
    assert len(wandb.named("log")) == 4 and len(mlflow.named("log_metrics")) == 3
