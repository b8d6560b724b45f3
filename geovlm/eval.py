"""``python -m geovlm.eval``: the paper's evaluation protocol on a checkpoint, and its Python API.

``evaluate`` runs batched greedy generation over samples (sharded by rank under torchrun and
gathered with ``all_gather_object``), writes every prediction to a JSONL file as it goes, and
scores the predictions per task family with ``geovlm.metrics`` plus the mean task reward of
``geovlm.rewards.score`` (so training's reward and evaluation read completions the same way).
The trainer calls ``evaluate`` at the end of every stage; the CLI calls the same function, so
both print the same table.

The CLI scores with the ``geovlm`` protocol (the project's metrics and rewards) or the
``earthdial`` one (the paper's columns as EarthDial's scripts compute them, ``--earthdial-fixes``
for their bugs corrected; ``docs/evaluation.md``), and ``--predictions`` scores existing answers
without a model: EarthDial's result files as they are, or this project's predictions with the
``--data`` they answer. ``score_benchmarks`` / ``write_tables`` give the paper's layout, one row
per benchmark (``tables.md``, ``table_<task>.csv``).

Predictions file: one JSON object per line, ``{"id", "task", "prediction", "reference"}``.
A rerun skips every sample whose id is already there and reuses its stored prediction. Under
torchrun each rank appends to ``<stem>.rank<r>.jsonl`` beside it while generating; rank 0 merges
them into the predictions file at the end (a crashed multi-rank run resumes from those files).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from geovlm.data.schema import Sample
from geovlm.engines import build_engine

GenerateFn = Callable[[list[Sample]], list[str]]


# --------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """Metrics of one evaluation.

    Attributes:
        metrics: task -> metric name -> value (floats; ``n`` is the sample count), JSON-ready.
        predictions: the ``{"id", "task", "prediction", "reference"}`` records scored, in
            sample order.
    """

    metrics: dict[str, dict[str, float]]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """Markdown table ``| task | metric | value |``, tasks in registry order."""
        lines = ["| task | metric | value |", "|---|---|---|"]
        for task in _ordered_tasks(self.metrics):
            for name, value in self.metrics[task].items():
                shown = str(int(value)) if name == "n" else f"{value:.4f}"
                lines.append(f"| {task} | {name} | {shown} |")
        return "\n".join(lines)

    def summary(self) -> dict[str, tuple[str, float]]:
        """task -> (headline metric name, value): the paper's main number for each task
        (``TaskSpec.headline``; the first metric when a table lacks it)."""
        from geovlm.tasks import registry

        out = {}
        for task in _ordered_tasks(self.metrics):
            values = self.metrics[task]
            name = registry.get(task).headline if task in registry.names() else None
            if name not in values:
                name = next((k for k in values if k != "n"), "n")
            out[task] = (name, float(values[name]))
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``{"metrics": ..., "summary": ...}`` as JSON (atomically); returns the path."""
        return _write_json_atomic(path, {"metrics": self.metrics, "summary": self.summary()})


def _write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def _ordered_tasks(metrics: dict) -> list[str]:
    from geovlm.tasks import registry

    order = {task: i for i, task in enumerate(registry.names())}
    return sorted(metrics, key=lambda t: (order.get(t, len(order)), t))


# --------------------------------------------------------------------------- predictions file


def rank_file(path: Path, rank: int) -> Path:
    """Where rank ``rank`` appends its predictions while a multi-rank evaluation runs."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """id -> record of a predictions JSONL file (``{}`` if absent).

    A truncated last line (a run killed mid-write) is ignored: that sample is generated again.
    Any other unreadable line is an error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    out: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                break
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from err
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise ValueError(f"{path}:{number}: expected a JSON object, got {kind}")
        for key, kind in (("id", str), ("task", str), ("prediction", str)):
            if not isinstance(record.get(key), kind):
                raise ValueError(f"{path}:{number}: field {key!r} missing or not a string")
        out[record["id"]] = record
    return out


def stored_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """Every stored prediction: the merged file plus any per-rank files of an unfinished run."""
    path = Path(path)
    done = read_predictions(path)
    for extra in sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}")):
        done.update(read_predictions(extra))
    return done


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    """Append records, one line each; a truncated last line (killed mid-write) is cut first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                handle.seek(0)
                handle.truncate(handle.read().rfind(b"\n") + 1)
        handle.seek(0, os.SEEK_END)
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _merge_files(path: Path, records: list[dict[str, Any]]) -> None:
    """Rank 0 after a multi-rank run: one predictions file, then drop the per-rank files."""
    merged = read_predictions(path)
    merged.update({r["id"]: r for r in records})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged.values()),
                   encoding="utf-8")
    tmp.replace(path)
    for extra in path.parent.glob(f"{path.stem}.rank*{path.suffix}"):
        extra.unlink(missing_ok=True)


# --------------------------------------------------------------------------- generation


def greedy_generator(
    model, processor, max_new_tokens: int, rollout_engine: str = "builtin"
) -> GenerateFn:
    """Greedy completions of a batch of samples, one each, from the rollout engine registered
    as ``rollout_engine`` (``geovlm.engines``). The returned callable also has the engine's
    ``prepare`` (or None), so ``evaluate`` can collate the next batches in background workers."""
    # Here, not at the top: the CLI checks its input before torch is imported.
    from geovlm.engines.base import EngineSetup, Sampling, prompt_preparer

    engine = build_engine(rollout_engine, model, processor, EngineSetup())
    sampling = Sampling(max_new_tokens, greedy=True)

    def generate(samples: list[Sample], prepared: Any = None) -> list[str]:
        extra = {} if prepared is None else {"prepared": prepared}
        return list(engine.generate(samples, 1, sampling, **extra).texts)

    generate.prepare = prompt_preparer(engine)
    return generate


def _pixel_budget(processor) -> tuple[int, int] | None:
    """The processor's ``(min_pixels, max_pixels)``, to read Qwen2.5-VL boxes exactly."""
    if processor is None:
        return None
    from geovlm.data.collate import pixel_budget

    try:
        return pixel_budget(processor)
    except (AttributeError, ValueError):
        return None


# --------------------------------------------------------------------------- scoring


def score_predictions(
    samples: Sequence[Sample],
    completions: Sequence[str],
    *,
    convention: str = "qwen25vl",
    use_embeddings: bool = False,
    meteor_backend: str = "coco",
    pixel_budget: tuple[int, int] | None = None,
    protocol: str = "geovlm",
    earthdial_fixes: bool = False,
) -> dict[str, dict[str, float]]:
    """task -> metrics: ``n`` and the task family's metrics of ``protocol``
    (``geovlm.metrics.task_metrics``); with the ``"geovlm"`` protocol also the mean reward of
    ``geovlm.rewards.score`` (``reward`` and ``reward/<component>``) under the same box convention
    and pixel budget.
    """
    import numpy as np

    from geovlm.metrics import task_metrics
    from geovlm.rewards import RewardOptions, score

    budget = pixel_budget or (None, None)
    options = RewardOptions(
        convention=convention,
        min_pixels=budget[0],
        max_pixels=budget[1],
        use_embeddings=use_embeddings,
    )
    by_task: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(i)
    out: dict[str, dict[str, float]] = {}
    for task in _ordered_tasks(by_task):
        index = by_task[task]
        texts = [completions[i] for i in index]
        targets = [samples[i].target for i in index]
        prompts = [samples[i].prompt for i in index]
        values: dict[str, float] = {"n": len(index)}
        values.update(
            task_metrics(
                task,
                texts,
                targets,
                prompts=prompts,
                convention=convention,
                pixel_budget=pixel_budget,
                meteor_backend=meteor_backend,
                protocol=protocol,
                earthdial_fixes=earthdial_fixes,
            )
        )
        if protocol != "geovlm":
            out[task] = values
            continue
        rewards = score(task, texts, targets, options=options, prompts=prompts)
        values["reward"] = float(np.mean(rewards.total))
        for name, component in rewards.components.items():
            values[f"reward/{name}"] = float(np.mean(component))
        out[task] = values
    return out


# --------------------------------------------------------------------------- evaluate


def _distributed(world_size: int):
    """``torch.distributed`` when a process group spans ``world_size`` ranks, else ``None``."""
    if world_size <= 1:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world_size={world_size} needs an initialised torch.distributed process group "
            "(launch with torchrun)"
        )
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"world_size={world_size} but the process group has {dist.get_world_size()} ranks"
        )
    return dist


def _check_ids(samples: Sequence[Sample]) -> None:
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise ValueError(f"sample id {sample.id!r} occurs twice ({sample.source}); ids must be "
                             "unique to store and resume predictions")
        seen.add(sample.id)


def _record(sample: Sample, prediction: str) -> dict[str, Any]:
    return {
        "id": sample.id,
        "task": sample.task,
        "prediction": prediction,
        "reference": sample.target.answer,
    }


def evaluate(
    model,
    processor,
    samples: list[Sample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    convention: str = "qwen25vl",
    use_embeddings: bool = False,
    predictions_path: Path | None = None,
    desc: str = "eval",
    rank: int = 0,
    world_size: int = 1,
    meteor_backend: str = "coco",
    generate_fn: GenerateFn | None = None,
    workers: int = 0,
    protocol: str = "geovlm",
    earthdial_fixes: bool = False,
    rollout_engine: str = "builtin",
) -> EvalReport:
    """Generate greedy answers for ``samples`` and score them per task family.

    Args:
        model, processor: the policy (any Qwen2-VL / Qwen2.5-VL model and its processor).
        samples: the evaluation samples (unique ids); every rank passes the same list.
        batch_size: samples per ``generate`` call on each rank.
        max_new_tokens: generation budget per answer.
        convention: the box convention the model writes (``geovlm.data.boxes``).
        use_embeddings: score caption rewards with the sentence-embedding hybrid.
        predictions_path: JSONL file of predictions, appended as batches finish; ids already
            stored there are not generated again. ``None`` keeps predictions in memory only.
        desc: progress-bar label; the bar shows on rank 0 only.
        rank, world_size: this process's place under torchrun; rank ``r`` generates samples
            ``r, r + world_size, ...`` and the predictions are gathered with
            ``all_gather_object``. ``world_size=1`` needs no process group.
        meteor_backend: ``"coco"`` (pycocoevalcap, Java) or ``"nltk"``.
        generate_fn: ``list[Sample] -> list[str]`` used instead of the model's greedy decoding.
        protocol, earthdial_fixes: the metric set (``score_predictions``).
        rollout_engine: the ``geovlm.engines`` engine that decodes (``rollout.engine``).
        workers: background processes that prepare the next batches' prompts (images, chat
            template, tokens) while the model decodes (``geovlm.data.loader.prefetched``); 0
            prepares each batch inline. Only with the engine's greedy decoding, or a
            ``generate_fn`` that has a ``prepare`` attribute (and then takes ``prepared=``).

    Returns:
        The same ``EvalReport`` on every rank (metrics computed on rank 0 and broadcast).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < max(world_size, 1):
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    _check_ids(samples)
    dist = _distributed(world_size)
    path = Path(predictions_path) if predictions_path is not None else None
    done = stored_predictions(path) if path is not None else {}
    for sample in samples:
        stored = done.get(sample.id)
        if stored is not None and stored["task"] != sample.task:
            raise ValueError(
                f"{path}: stored prediction for id {sample.id!r} is for task {stored['task']!r}, "
                f"but the sample is {sample.task!r}; use another predictions file"
            )
    mine = samples[rank::world_size] if world_size > 1 else list(samples)
    todo = [s for s in mine if s.id not in done]
    out_file = None if path is None else (rank_file(path, rank) if dist else path)
    # A DDP-wrapped policy generates through its module (every rank holds full weights).
    from geovlm.data.loader import prefetched
    from geovlm.model import unwrap

    model = unwrap(model)
    generate = generate_fn or greedy_generator(model, processor, max_new_tokens, rollout_engine)

    was_training = getattr(model, "training", False)
    if model is not None and hasattr(model, "eval"):
        model.eval()
    new: list[dict[str, Any]] = []
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, disable=rank != 0,
               dynamic_ncols=True)
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    prepare = getattr(generate, "prepare", None)
    ahead = (
        prefetched(lambda i: prepare(batches[i]), range(len(batches)), workers)
        if prepare is not None and workers > 0
        else (None for _ in batches)
    )
    try:
        for batch, prepared in zip(batches, ahead, strict=True):
            texts = generate(batch) if prepared is None else generate(batch, prepared=prepared)
            if len(texts) != len(batch):
                raise RuntimeError(
                    f"generator returned {len(texts)} texts for {len(batch)} samples"
                )
            records = [_record(s, t) for s, t in zip(batch, texts, strict=True)]
            if out_file is not None:
                _append(out_file, records)
            new.extend(records)
            bar.update(len(batch))
    finally:
        bar.close()
        if model is not None and hasattr(model, "train"):
            model.train(was_training)

    if dist is not None:
        gathered: list[list[dict[str, Any]] | None] = [None] * world_size
        dist.all_gather_object(gathered, new)
        new = [record for part in gathered for record in (part or [])]
    results = dict(done)
    results.update({r["id"]: r for r in new})

    outcome: EvalReport | BaseException | None = None
    if rank == 0:
        try:
            if dist is not None and path is not None:
                _merge_files(path, new)
            records = [results[s.id] for s in samples]
            metrics = score_predictions(
                samples,
                [r["prediction"] for r in records],
                convention=convention,
                use_embeddings=use_embeddings,
                meteor_backend=meteor_backend,
                pixel_budget=_pixel_budget(processor),
                protocol=protocol,
                earthdial_fixes=earthdial_fixes,
            )
            outcome = EvalReport(metrics, records)
        except Exception as err:
            # The other ranks wait in the broadcast below: tell them, then fail everywhere.
            if dist is None:
                raise
            outcome = err
    if dist is not None:
        box = [outcome if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(box[0], BaseException):
            raise RuntimeError(f"evaluation failed on rank 0: {box[0]!r}")
        outcome = box[0]
    return cast(EvalReport, outcome)


# --------------------------------------------------------------------------- tables


def benchmark_of(sample: Sample, default: str) -> str:
    """The benchmark (table row) a sample belongs to: ``Target.meta["benchmark"]`` (set by the
    EarthDial / GeoChat readers), else ``default`` (the data file's name)."""
    return str(sample.target.meta.get("benchmark") or default)


def score_benchmarks(
    samples: Sequence[Sample], completions: Sequence[str], default: str, **options: Any
) -> dict[str, dict[str, dict[str, float]]]:
    """benchmark -> task -> metrics: ``score_predictions`` (with ``options``) per benchmark."""
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(benchmark_of(sample, default), []).append(i)
    return {
        name: score_predictions([samples[i] for i in index], [completions[i] for i in index],
                                **options)
        for name, index in groups.items()
    }


def paper_tables(results: dict[str, dict[str, dict[str, float]]]) -> tuple[str, dict[str, str]]:
    """The paper's layout of ``score_benchmarks`` results: one table per task family (registry
    order), one row per benchmark, one column per metric. Returns the Markdown document and
    task -> CSV text (full precision; an empty cell where a benchmark lacks a metric)."""
    by_task: dict[str, dict[str, dict[str, float]]] = {}
    for benchmark, tasks in results.items():
        for task, values in tasks.items():
            by_task.setdefault(task, {})[benchmark] = values
    markdown: list[str] = []
    tables: dict[str, str] = {}
    for task in _ordered_tasks(by_task):
        rows = by_task[task]
        columns = list(dict.fromkeys(k for values in rows.values() for k in values if k != "n"))
        header = ["benchmark", "n", *columns]
        markdown += [f"### {task}", "", "| " + " | ".join(header) + " |",
                     "|" + "---|" * len(header)]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for benchmark, values in rows.items():
            n = str(int(values.get("n", 0)))
            shown = [f"{values[c]:.4f}" if c in values else "" for c in columns]
            markdown.append("| " + " | ".join([benchmark, n, *shown]) + " |")
            writer.writerow([benchmark, n, *[repr(values[c]) if c in values else ""
                                             for c in columns]])
        markdown.append("")
        tables[task] = buffer.getvalue()
    return "\n".join(markdown), tables


def write_tables(out: Path, results: dict[str, dict[str, dict[str, float]]]) -> list[Path]:
    """``tables.md`` and one ``table_<task>.csv`` per task family in ``out``; returns them."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, tables = paper_tables(results)
    written = [out / "tables.md"]
    written[0].write_text(markdown + "\n", encoding="utf-8")
    for task, text in tables.items():
        path = out / f"table_{task}.csv"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return written


# --------------------------------------------------------------------------- CLI


class EvalInputError(ValueError):
    """A checkpoint, data file or option the CLI cannot use; the message names it."""


PROTOCOLS = ("geovlm", "earthdial")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m geovlm.eval",
        description="Evaluate a checkpoint (greedy answers, then per-task metrics), or score "
        "existing predictions without a model. Writes predictions.jsonl, metrics.json and the "
        "paper's tables (tables.md, table_<task>.csv: one row per benchmark).",
    )
    parser.add_argument("--checkpoint", default=None,
                        help="HF model directory (a geovlm checkpoint or a Qwen2/2.5-VL model) or "
                        "LoRA adapters (merged into the base they name); "
                        "with --predictions only its run_config.yaml and pixel budget are read")
    parser.add_argument("--predictions", nargs="+", default=None, metavar="FILE.jsonl",
                        help="score these predictions instead of generating: EarthDial's "
                        "results/*.jsonl (or GeoChat answer files) as they are, or this "
                        "project's predictions.jsonl (with --data, the benchmark they answer)")
    parser.add_argument("--data", default=None,
                        help="benchmark: LLaVA/GeoChat JSON, VLM-R1 JSONL, EarthDial / GeoChat "
                        "benchmark JSONL, an EarthDial Arrow test set (a folder), or 'embedded' "
                        "(the embedded world's test split; 'embedded:val' for another split); "
                        "default embedded")
    parser.add_argument("--protocol", default="geovlm", choices=PROTOCOLS,
                        help="geovlm: the project's metrics (and mean rewards); earthdial: every "
                        "column of the paper's tables as EarthDial's scripts compute it")
    parser.add_argument("--earthdial-fixes", action="store_true",
                        help="with --protocol earthdial: correct the scripts' bugs instead of "
                        "reproducing them (docs/evaluation.md)")
    parser.add_argument("--task", default=None,
                        help="the task family of every record (default: inferred per record)")
    parser.add_argument("--image-root", default=None, help="directory of relative image paths")
    parser.add_argument("--format", default="auto",
                        choices=("auto", "llava", "geochat", "vlmr1", "earthdial"),
                        help="benchmark file format (default: detected)")
    parser.add_argument("--source-convention", default=None,
                        choices=("pixels", "qwen2vl", "qwen25vl", "geochat"),
                        help="convention of bracketed boxes in the benchmark file (default: the "
                        "format's: geochat (0..100) for EarthDial / GeoChat benchmarks, else "
                        "pixels; GeoChat {<..>} boxes are always geochat)")
    parser.add_argument("--box-layout", default=None, choices=("corners", "centre", "xyxy"),
                        help="five bracketed numbers: x1, y1, x2, y2, θ (corners; EarthDial / "
                        "GeoChat benchmarks) or cx, cy, w, h, θ (centre; the other formats' "
                        "default); xyxy refuses them")
    parser.add_argument("--tasks", default=None, help="comma-separated task families to keep")
    parser.add_argument("--task-modules", default=None,
                        help="comma-separated modules that register more tasks (besides the "
                        "checkpoint's run_config.yaml data.task_modules)")
    parser.add_argument("--workers", type=int, default=None,
                        help="background processes that prepare the next batches' prompts "
                        "(default: up to 4 on CUDA, 1 on CPU when at least 3 cores are free)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-samples-per-task", type=int, default=None,
                        help="keep the first N samples of each task")
    parser.add_argument("--out", default=None,
                        help="output directory (default <checkpoint>/eval, or ./eval when "
                        "scoring --predictions without a checkpoint)")
    parser.add_argument("--convention", default=None,
                        choices=("pixels", "qwen2vl", "qwen25vl", "geochat"),
                        help="box convention of the answers (default: geochat for EarthDial "
                        "result files, else the checkpoint's run_config.yaml "
                        "model.box_convention, else qwen25vl)")
    parser.add_argument("--meteor", default="coco", choices=("coco", "nltk"),
                        help="METEOR of the geovlm protocol (pycocoevalcap needs Java; the "
                        "earthdial protocol always uses NLTK's, as its scripts)")
    parser.add_argument("--use-embeddings", action="store_true",
                        help="caption rewards with the sentence-embedding hybrid")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


def read_run_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``run_config.yaml`` as plain data (``{}`` when there is none)."""
    import yaml

    path = Path(checkpoint) / "run_config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise EvalInputError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise EvalInputError(f"{path}: expected a mapping at the top level")
    return data


def _section(run_config: dict[str, Any], key: str) -> dict[str, Any]:
    value = run_config.get(key) or {}
    return value if isinstance(value, dict) else {}


def embedded_samples(
    split: str,
    run_config: dict[str, Any],
    convention: str,
    pixel_budget: tuple[int | None, int | None] = (None, None),
) -> list[Sample]:
    """A split of the embedded world: its defaults, or the data settings of the checkpoint's run
    (``data.seed``, ``data.n_<split>_scenes``, ``data.n_test_scenes_by_task``,
    ``data.image_size``, ``data.tasks``, ``data.object_scale``, ``data.max_objects``), boxes in
    the frame of the processor's ``pixel_budget``."""
    import inspect

    from geovlm.data.synthetic import WorldSettings, embedded_splits

    if split not in ("train", "val", "test"):
        raise EvalInputError(f"--data embedded:{split}: split must be train, val or test")
    data = _section(run_config, "data")
    defaults = inspect.signature(embedded_splits).parameters
    kwargs: dict[str, Any] = {
        "convention": convention, "min_pixels": pixel_budget[0], "max_pixels": pixel_budget[1]
    }
    for key in ("seed", "image_size", "tasks"):
        if data.get(key) is not None:
            kwargs[key] = data[key]
    # Splits come from disjoint seed streams, so the other splits need not be generated.
    for name in ("train", "val", "test"):
        count = data.get(f"n_{name}_scenes")
        if name != split:
            kwargs[f"n_{name}"] = 0
        elif count is not None:
            kwargs[f"n_{name}"] = count
        else:
            kwargs[f"n_{name}"] = defaults[f"n_{name}"].default
    if split == "test" and data.get("n_test_scenes_by_task"):
        from geovlm.data.sources import test_scenes_by_task

        kwargs["n_test_by_task"] = test_scenes_by_task(
            data["n_test_scenes_by_task"], data.get("tasks")
        )
    world = {key: data[key] for key in ("object_scale", "max_objects") if data.get(key) is not None}
    try:
        # The checkpoint's own world: a model trained on large objects is judged on large ones.
        kwargs["world"] = WorldSettings(**world)
        return embedded_splits(**kwargs)[split]
    except (TypeError, ValueError) as err:
        raise EvalInputError(f"run_config.yaml data settings do not fit the embedded world: {err}"
                             ) from err


def import_task_modules(run_config: dict[str, Any], extra: str | None = None) -> None:
    """Register the tasks of the run's ``data.task_modules`` and of ``--task-modules``."""
    from geovlm.tasks import registry

    modules = _section(run_config, "data").get("task_modules") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise EvalInputError(f"run_config.yaml data.task_modules: expected a list, got {modules!r}")
    named = [m.strip() for m in (extra or "").split(",") if m.strip()]
    registry.import_task_modules([*modules, *named])


def checkpoint_pixel_budget(checkpoint: Path) -> tuple[int | None, int | None]:
    """``(min_pixels, max_pixels)`` saved with a checkpoint's image processor (``None`` if absent;
    ``geovlm.data.boxes.saved_pixel_budget``)."""
    from geovlm.data.boxes import saved_pixel_budget

    try:
        return saved_pixel_budget(checkpoint)
    except ValueError as err:
        raise EvalInputError(str(err)) from err


def load_samples(
    data: str,
    image_root: str | None,
    fmt: str,
    convention: str,
    run_config: dict[str, Any],
    *,
    source_convention: str | None = None,
    pixel_budget: tuple[int | None, int | None] = (None, None),
    box_layout: str | None = None,
    task: str | None = None,
) -> list[Sample]:
    """``--data``: ``embedded[:split]`` or a benchmark read by ``geovlm.data.readers`` (its
    bracketed boxes in ``source_convention`` and ``box_layout``; prompts and answers rendered in
    the model's ``convention`` with the processor's ``pixel_budget``; ``task`` for every
    record)."""
    if data == "embedded" or data.startswith("embedded:"):
        split = data.partition(":")[2] or "test"
        return embedded_samples(split, run_config, convention, pixel_budget)
    from geovlm.data.readers import read_samples

    path = Path(data)
    if not path.exists():
        raise EvalInputError(f"--data {data}: no such file or folder (or use 'embedded')")
    return read_samples(
        path,
        image_root=image_root,
        fmt=fmt,
        task=task,
        convention=convention,
        source_convention=source_convention,
        min_pixels=pixel_budget[0],
        max_pixels=pixel_budget[1],
        box_layout=box_layout,
    )


def blind_scores(
    data: str,
    samples: list[Sample],
    convention: str,
    run_config: dict[str, Any],
    pixel_budget: tuple[int | None, int | None] = (None, None),
) -> dict[str, float]:
    """``{task: headline metric}`` of image-blind answers on ``samples`` (``--data``'s): the
    majority answer of the label tasks and, on the embedded world, whose train split the run
    config rebuilds, the best train box per prompt text of the box tasks
    (``geovlm.heldout.blind_baseline``). A benchmark file has no train split here: label tasks
    only."""
    from geovlm.heldout import blind_baseline, majority_baseline

    if data == "embedded" or data.startswith("embedded:"):
        train = embedded_samples("train", run_config, convention, pixel_budget)
        return blind_baseline(train, samples, convention)
    return majority_baseline(samples, convention)


def blind_table(report: EvalReport, blind: dict[str, float]) -> str:
    """``| task | metric | model | blind |`` for the tasks that have a blind baseline."""
    lines = ["| task | metric | model | blind |", "|---|---|---|---|"]
    for task, (name, value) in report.summary().items():
        if task in blind:
            lines.append(f"| {task} | {name} | {value:.4f} | {blind[task]:.4f} |")
    return "\n".join(lines)


def select_samples(
    samples: list[Sample], tasks: list[str] | None, max_per_task: int | None
) -> list[Sample]:
    """Keep the listed tasks (all when ``None``) and the first ``max_per_task`` of each."""
    if tasks is not None:
        from geovlm.tasks import registry

        unknown = sorted(set(tasks) - set(registry.names()))
        if unknown:
            raise EvalInputError(
                f"--tasks: unknown task(s) {unknown}; known: {list(registry.names())}"
            )
        samples = [s for s in samples if s.task in set(tasks)]
    if max_per_task is not None:
        if max_per_task < 1:
            raise EvalInputError(f"--max-samples-per-task must be >= 1, got {max_per_task}")
        seen: dict[str, int] = {}
        kept = []
        for sample in samples:
            if seen.get(sample.task, 0) < max_per_task:
                seen[sample.task] = seen.get(sample.task, 0) + 1
                kept.append(sample)
        samples = kept
    return samples


def _default_benchmark(data: str) -> str:
    if data == "embedded" or data.startswith("embedded:"):
        return "embedded"
    from geovlm.data.earthdial import benchmark_name

    return benchmark_name(Path(data))


def _prepare(args: argparse.Namespace) -> tuple[Path, str, list[Sample], Path, dict[str, Any]]:
    """Checks and data loading before any model is built: (checkpoint, convention, samples, out,
    the checkpoint's run config)."""
    from geovlm.checkpoint import holds_model

    checkpoint = Path(args.checkpoint)
    if not holds_model(checkpoint):
        raise EvalInputError(
            f"--checkpoint {checkpoint}: not a model directory (no config.json, nor the "
            "adapter_config.json of LoRA adapters)"
        )
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise EvalInputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers is not None and args.workers < 0:
        raise EvalInputError("--workers must be >= 0")
    run_config = read_run_config(checkpoint)
    import_task_modules(run_config, args.task_modules)
    convention = (args.convention or _section(run_config, "model").get("box_convention")
                  or "qwen25vl")
    samples = _benchmark_samples(args, convention, run_config, checkpoint_pixel_budget(checkpoint))
    out = Path(args.out) if args.out else checkpoint / "eval"
    stored_predictions(out / "predictions.jsonl")
    return checkpoint, convention, samples, out, run_config


def _benchmark_samples(args, convention: str, run_config: dict, budget) -> list[Sample]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.task is not None:
        from geovlm.tasks import registry

        if args.task not in registry.names():
            raise EvalInputError(f"--task {args.task}: unknown; known: {list(registry.names())}")
    samples = load_samples(
        args.data or "embedded",
        args.image_root,
        args.format,
        convention,
        run_config,
        source_convention=args.source_convention,
        pixel_budget=budget,
        box_layout=args.box_layout,
        task=args.task,
    )
    samples = select_samples(samples, tasks, args.max_samples_per_task)
    if not samples:
        raise EvalInputError(f"--data {args.data}: no samples left for tasks {tasks or 'all'}")
    return samples


def _is_result_file(path: Path) -> bool:
    """An EarthDial / GeoChat answer file (``answer`` + ground truth), not this project's
    predictions (``id`` + ``prediction``)."""
    with path.open(encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        record = json.loads(first) if first else {}
    except json.JSONDecodeError as err:
        raise EvalInputError(f"{path}:1: not a JSON object ({err.msg})") from err
    return isinstance(record, dict) and "answer" in record and "prediction" not in record


def score_files(args: argparse.Namespace) -> tuple[dict, Path]:
    """``--predictions``: every file scored without a model -> (benchmark -> task -> metrics,
    output folder)."""
    run_config: dict[str, Any] = {}
    budget: tuple[int | None, int | None] = (None, None)
    if args.checkpoint is not None:
        run_config = read_run_config(Path(args.checkpoint))
        budget = checkpoint_pixel_budget(Path(args.checkpoint))
    import_task_modules(run_config, args.task_modules)
    options = dict(meteor_backend=args.meteor, protocol=args.protocol,
                   earthdial_fixes=args.earthdial_fixes, use_embeddings=args.use_embeddings)
    own_convention = (args.convention or _section(run_config, "model").get("box_convention")
                      or "qwen25vl")
    results: dict[str, dict[str, dict[str, float]]] = {}
    data_samples: list[Sample] | None = None
    for name in args.predictions:
        path = Path(name)
        if not path.is_file():
            raise EvalInputError(f"--predictions {name}: no such file")
        if _is_result_file(path):
            from geovlm.data.earthdial import read_results

            samples, completions = read_results(path, task=args.task,
                                                box_layout=args.box_layout or "corners")
            convention, file_budget = args.convention or "geochat", None
            default = path.stem
        else:
            if args.data is None:
                raise EvalInputError(f"--predictions {name}: this project's predictions need "
                                     "--data, the benchmark they answer")
            if data_samples is None:
                data_samples = _benchmark_samples(args, own_convention, run_config, budget)
            by_id = {s.id: s for s in data_samples}
            records = read_predictions(path)
            missing = sorted(set(records) - set(by_id))
            if missing:
                raise EvalInputError(f"{path}: {len(missing)} prediction id(s) not in --data "
                                     f"{args.data}, e.g. {missing[:3]}")
            samples = [by_id[i] for i in records]
            completions = [records[i]["prediction"] for i in records]
            convention, default = own_convention, _default_benchmark(args.data)
            file_budget = budget if None not in budget else None
        scored = score_benchmarks(samples, completions, default, convention=convention,
                                  pixel_budget=file_budget, **options)
        for benchmark, tasks in scored.items():
            results.setdefault(benchmark, {}).update(tasks)
    out = Path(args.out) if args.out else (
        Path(args.checkpoint) / "eval" if args.checkpoint else Path("eval"))
    return results, out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for unusable input, with a one-line error)."""
    args = parse_args(argv)
    if args.predictions is not None:
        try:
            results, out = score_files(args)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        written = write_tables(out, results)
        print(f"\n## {args.protocol} protocol\n\n{paper_tables(results)[0]}", flush=True)
        print("tables: " + ", ".join(str(p) for p in written))
        return 0
    if args.checkpoint is None:
        print("error: give --checkpoint (to generate answers) or --predictions (to score them)",
              file=sys.stderr)
        return 2
    try:
        checkpoint, convention, samples, out, run_config = _prepare(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from geovlm.data.loader import auto_workers
    from geovlm.model import build_policy
    from geovlm.runtime import RuntimeSetupError, shutdown, start

    try:
        runtime = start(args.device)
    except RuntimeSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rank, world = runtime.rank, runtime.world_size
    model, processor = build_policy(path=str(checkpoint), device=runtime.device)
    try:
        report = evaluate(
            model,
            processor,
            samples,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            convention=convention,
            use_embeddings=args.use_embeddings,
            predictions_path=out / "predictions.jsonl",
            desc=f"eval {checkpoint.name}",
            rank=rank,
            world_size=world,
            meteor_backend=args.meteor,
            protocol=args.protocol,
            earthdial_fixes=args.earthdial_fixes,
            workers=auto_workers(runtime.device, args.workers),
        )
        results = None
        if rank == 0:
            texts = [r["prediction"] for r in report.predictions]
            results = score_benchmarks(
                samples, texts, _default_benchmark(args.data or "embedded"),
                convention=convention, use_embeddings=args.use_embeddings,
                meteor_backend=args.meteor, pixel_budget=_pixel_budget(processor),
                protocol=args.protocol, earthdial_fixes=args.earthdial_fixes,
            )
    except (EvalInputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if rank == 0:
        report.save(out / "metrics.json")
        # Only the process that prints it computes the baseline (it rebuilds the train split).
        blind = blind_scores(args.data or "embedded", samples, convention, run_config,
                             checkpoint_pixel_budget(checkpoint))
        _write_json_atomic(out / "blind.json", blind)
        write_tables(out, results)
        print(f"\n## Evaluation of {checkpoint} on {args.data or 'embedded'}\n\n"
              f"{report.table()}\n", flush=True)
        if blind:
            from geovlm.report import BLIND_NOTE

            print(f"Against the image-blind baseline ({BLIND_NOTE})\n\n"
                  f"{blind_table(report, blind)}\n", flush=True)
        print(f"predictions: {out / 'predictions.jsonl'}\nmetrics: {out / 'metrics.json'}\n"
              f"blind baseline: {out / 'blind.json'}\ntables: {out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
