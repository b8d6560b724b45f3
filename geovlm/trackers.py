"""Experiment trackers (``report_to``): TensorBoard, Weights & Biases, Trackio, MLflow.

What every tracker receives, on rank 0 only:

- the resolved config when it opens, once per launch (TensorBoard: a YAML text under
  ``config``; W&B and Trackio: the run's config; MLflow: flattened params plus ``config.yaml``
  as an artifact);
- every record of ``metrics.jsonl`` as scalars tagged ``<stage>/<metric>`` (``sft/loss``,
  ``grpo_labels/reward/format``);
- after the held-out evaluation that follows each stage (and ``init``, before training): the
  headline metric of every task as a scalar ``heldout/<task>/<metric>``, and the whole held-out
  table so far (``geovlm.report.summary_table``) as Markdown text / a table.

Steps. Trackers need one x-axis that only grows (W&B drops a step lower than one it has seen),
so a record of step ``s`` (0-based) of stage ``k`` is logged at the *global step*
``offset(k) + s + 1``, where ``offset(k)`` is the sum of the steps of the stages before it: the
number of optimizer steps the run has taken once the step is done. The held-out table after
stage ``k`` is logged at ``offset(k) + steps(k)``, the one before training at 0.

Resume. ``metrics.jsonl`` drops the records a resumed stage recomputes; TensorBoard does the
same (a ``SessionLog.START`` at the resume step makes its readers discard later events of the
interrupted attempt). W&B, Trackio and MLflow continue the same tracker run (its id is kept in
``<run>/trackers.json``); the replayed steps carry the same values (resume is exact), which W&B
ignores as already logged and MLflow / Trackio store once more.

The backends' packages are imported only when chosen; a missing one is a ``ConfigError`` that
names the extra to install, raised on every rank before anything is built.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from geovlm.config import ConfigError, RunConfig, report_targets

# Backend name -> (module imported, ``pip install`` target that provides it).
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "geovlm[wandb]"),
    "trackio": ("trackio", "geovlm[trackio]"),
    "mlflow": ("mlflow", "geovlm[mlflow]"),
}
IDS_FILE = "trackers.json"
# Project / experiment name unless the backend's own environment variable sets it.
DEFAULT_PROJECT = "geovlm"


def check_trackers(config: RunConfig) -> list[str]:
    """The trackers ``report_to`` names; a ``ConfigError`` naming what to install for each one
    whose package is missing (checked before anything is built, on every rank)."""
    names = report_targets(config.report_to)
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        fixes = "; ".join(f"{n} needs pip install '{PACKAGES[n][1]}'" for n in missing)
        raise ConfigError(f"report_to={','.join(names)}: {fixes} (or drop it from report_to)")
    return names


def global_step(config: RunConfig, stage: str, step: int) -> int:
    """The run-wide step after step ``step`` (0-based) of stage ``stage`` (module docstring)."""
    offset = 0
    for entry in config.stages:
        if entry.name == stage:
            return offset + step + 1
        offset += entry.steps
    raise KeyError(f"no stage named {stage!r}")


def stage_end_step(config: RunConfig, label: str) -> int:
    """The global step of the held-out table after ``label`` (a stage, or ``init``: 0)."""
    if label == "init":
        return 0
    stage = next(entry for entry in config.stages if entry.name == label)
    return global_step(config, label, stage.steps - 1)


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record as ``{"<stage>/<metric>": value}`` (numbers only; NaN kept)."""
    stage = record["stage"]
    return {
        f"{stage}/{key}": float(value)
        for key, value in record.items()
        if key not in ("stage", "kind", "step")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def heldout_scalars(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{task: {metric: value}}`` of one held-out evaluation as ``heldout/<task>/<metric>``."""
    return {
        f"heldout/{task}/{metric}": float(value)
        for task, row in summary.items()
        for metric, value in row.items()
    }


def heldout_rows(summaries: dict[str, dict]) -> tuple[list[str], list[list[Any]]]:
    """Columns ``task, metric, <label>...`` and one row per task and metric (None where not
    evaluated); ``summaries``: ``{label: {task: {metric: value}}}``."""
    from geovlm.tasks import registry

    labels = list(summaries)
    tasks = [t for t in registry.names() if any(t in s for s in summaries.values())]
    rows = []
    for task in tasks:
        metrics = dict.fromkeys(m for s in summaries.values() for m in s.get(task, {}))
        for metric in metrics:
            values = [summaries[label].get(task, {}).get(metric) for label in labels]
            rows.append([task, metric, *(None if v is None else float(v) for v in values)])
    return ["task", "metric", *labels], rows


def flat_config(config: dict) -> dict[str, Any]:
    """The config as ``{"stages.0.lr": 1e-5, ...}``, non-scalar leaves (lists, null) as text."""
    from geovlm.rundir import flatten

    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in flatten(config).items()
    }


# --------------------------------------------------------------------------- backends


class TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` writing ``<run>/tensorboard``; flushed after
    every call, so an interrupted run loses nothing."""

    def __init__(self, config: RunConfig, ids: _RunIds):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(config.run_dir / "tensorboard"))
        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        # TensorBoard renders text as Markdown: a code block keeps the YAML's indentation.
        self.writer.add_text("config", "```yaml\n" + text + "```", 0)
        self.writer.flush()

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_table(self, name: str, columns, rows, markdown: str, step: int) -> None:
        self.writer.add_text(name, markdown, step)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        # Readers drop every event of an earlier attempt with a step >= this one.
        self.writer.file_writer.add_event(
            Event(step=step, session_log=SessionLog(status=SessionLog.START))
        )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A W&B run named after the run (project ``WANDB_PROJECT``, default ``geovlm``), continued
    across relaunches (its id in ``trackers.json``)."""

    def __init__(self, config: RunConfig, ids: _RunIds):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            name=config.name,
            id=ids.get("wandb"),
            resume="allow",
            dir=str(config.run_dir),
        )
        ids.set("wandb", self.run.id)
        # A relaunch under --existing-run resume-changed may change values.
        self.run.config.update(config.to_dict(), allow_val_change=True)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, name: str, columns, rows, markdown: str, step: int) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def rewind(self, step: int) -> None:
        """W&B keeps what it has; replayed steps are ignored (module docstring)."""

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A Trackio run named after the run (project ``TRACKIO_PROJECT``, default ``geovlm``;
    local unless ``TRACKIO_SPACE_ID`` names a Space), continued across relaunches."""

    def __init__(self, config: RunConfig, ids: _RunIds):
        import trackio

        self.trackio = trackio
        trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", DEFAULT_PROJECT),
            name=config.name,
            config=config.to_dict(),
            resume="allow",
        )

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def log_table(self, name: str, columns, rows, markdown: str, step: int) -> None:
        self.trackio.log({name: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def rewind(self, step: int) -> None:
        """Trackio keeps what it has (module docstring)."""

    def close(self) -> None:
        self.trackio.finish()


class Mlflow:
    """An MLflow run named after the run in experiment ``MLFLOW_EXPERIMENT_NAME`` (default
    ``geovlm``) at ``MLFLOW_TRACKING_URI`` (default: MLflow's own), continued across relaunches.

    The config goes in as flattened params (write-once in MLflow: a continued run keeps those of
    its first launch) and as the artifact ``config.yaml`` (rewritten at every launch).
    """

    # MLflow accepts at most 100 params per request.
    PARAMS_PER_CALL = 100

    def __init__(self, config: RunConfig, ids: _RunIds):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_EXPERIMENT_NAME" not in os.environ:
            mlflow.set_experiment(DEFAULT_PROJECT)
        run_id = ids.get("mlflow")
        if run_id is not None:
            mlflow.start_run(run_id=run_id)
        else:
            run = mlflow.start_run(run_name=config.name)
            ids.set("mlflow", run.info.run_id)
            params = list(flat_config(config.to_dict()).items())
            for start in range(0, len(params), self.PARAMS_PER_CALL):
                mlflow.log_params(dict(params[start : start + self.PARAMS_PER_CALL]))
        mlflow.log_text(yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        # MLflow's stores refuse NaN (e.g. a clip ratio with no token in its region): such a
        # metric is left out at that step.
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        if finite:
            self.mlflow.log_metrics(finite, step=step)

    def log_table(self, name: str, columns, rows, markdown: str, step: int) -> None:
        self.mlflow.log_text(markdown, f"{name}/step_{step}.md")

    def rewind(self, step: int) -> None:
        """MLflow keeps what it has (module docstring)."""

    def close(self) -> None:
        self.mlflow.end_run()


class _RunIds:
    """The tracker run ids of a geovlm run, kept in ``<run>/trackers.json``."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / IDS_FILE
        self.ids = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, name: str) -> str | None:
        return self.ids.get(name)

    def set(self, name: str, run_id: str) -> None:
        if self.ids.get(name) != run_id:
            self.ids[name] = run_id
            self.path.write_text(json.dumps(self.ids, indent=2))


# --------------------------------------------------------------------------- the run's trackers


class Trackers:
    """The run's chosen trackers (none on ranks other than 0): the stages, ``train.py`` and
    ``geovlm.report`` call these, each fans out to every backend."""

    def __init__(self, config: RunConfig, backends: Sequence[Any] = ()):
        self.config = config
        self.backends = list(backends)

    def log_record(self, record: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` record (``stage``, ``step`` and numbers)."""
        if not self.backends:
            return
        step = global_step(self.config, record["stage"], record["step"])
        scalars = record_scalars(record)
        for backend in self.backends:
            backend.log_scalars(scalars, step)

    def log_heldout(self, label: str, summaries: dict[str, dict], markdown: str) -> None:
        """The held-out table after ``label``: its headline scalars and the table so far."""
        if not self.backends or label not in summaries:
            return
        step = stage_end_step(self.config, label)
        scalars = heldout_scalars(summaries[label])
        columns, rows = heldout_rows(summaries)
        for backend in self.backends:
            backend.log_scalars(scalars, step)
            backend.log_table("heldout/summary", columns, rows, markdown, step)

    def rewind(self, stage: str, next_step: int) -> None:
        """Stage ``stage`` resumes at ``next_step``: what was logged from there on is stale."""
        if not self.backends:
            return
        step = global_step(self.config, stage, next_step)
        for backend in self.backends:
            backend.rewind(step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


BACKENDS = {"tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio, "mlflow": Mlflow}


def open_trackers(config: RunConfig, is_main: bool) -> Trackers:
    """The trackers of ``config.report_to``, each opened with the resolved config.

    Checked on every rank (a missing package is a ``ConfigError`` everywhere, not a hang),
    opened on rank 0 only; call it once the run folder exists.
    """
    names = check_trackers(config)
    if not is_main or not names:
        return Trackers(config)
    ids = _RunIds(config.run_dir)
    return Trackers(config, [BACKENDS[name](config, ids) for name in names])
