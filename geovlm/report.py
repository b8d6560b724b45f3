"""The run's report: ``summary.md`` / ``summary.json`` and the plots, redrawn whenever a run ends,
and the held-out table sent to the experiment trackers after every evaluation.

``summary.md`` holds, for every task, its headline metric (and the secondary metrics of
``REPORTED_METRICS`` it has) after every stage, columns in stage order with ``init`` first; the
image-blind baseline (``BLIND_NOTE``); which stages trained the task; and each
GRPO stage's objective (mean sampled reward on held-out prompts) before and after it; and, where
the embedded tower was pretrained (``init/vision_pretrain.json``), its read-out scores.
``summary.json`` holds the same numbers as data, ``training_curves.png`` the curves of
``metrics.jsonl``, ``held_out.png`` the held-out metrics per stage.

Shapes: a stage's held-out summary is ``{task: {metric: value}}``, the headline metric first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from geovlm.tasks import registry

if TYPE_CHECKING:
    from geovlm.trackers import Trackers

# Metrics reported next to a task's headline wherever its evaluation computes them: mean IoU
# shows how far the boxes moved when acc@0.5 (a threshold) barely moves.
REPORTED_METRICS: tuple[str, ...] = ("mean_iou",)


def held_out_rows(
    metrics: dict[str, dict[str, float]], headline: dict[str, tuple[str, float]]
) -> dict[str, dict[str, float]]:
    """``{task: {headline: value, <REPORTED_METRICS it has>: value}}`` from an evaluation's
    metrics (``{task: {metric: value}}``) and headline summary (``{task: (metric, value)}``)."""
    out: dict[str, dict[str, float]] = {}
    for task, (name, value) in headline.items():
        row = {name: float(value)}
        for extra in REPORTED_METRICS:
            if extra != name and extra in metrics.get(task, {}):
                row[extra] = float(metrics[task][extra])
        out[task] = row
    return out


def _marked(summaries: dict[str, dict], trained: dict[str, list[str]]) -> dict[str, set[str]]:
    """``{stage label: tasks whose cells are bold}``: the tasks a stage trained, unless it
    trained every task of the table (SFT), which would make its whole column bold."""
    tasks = {t for s in summaries.values() for t in s}
    out = {}
    for label in summaries:
        mine = set(trained.get(label, ())) & tasks
        out[label] = set() if mine == tasks else mine
    return out


# What the "blind" column of summary.md holds (``geovlm.heldout.blind_baseline``).
BLIND_NOTE = (
    "blind: the metric of answers that ignore the image: the most frequent held-out answer "
    "(label tasks), the train split's best box for the same prompt text (box tasks). A task is "
    "learnt from the image only where it beats this."
)


# What "SFT anchor in" of the "trained by" column means (``geovlm.anchor``).
ANCHOR_NOTE = (
    "SFT anchor in: GRPO stages that kept the task's SFT targets in their loss (next-token "
    "loss on a few of its training samples a step, so that the stage does not overwrite it); "
    "they did not reward it."
)


def summary_table(
    summaries: dict[str, dict[str, dict[str, float]]],
    objective: dict[str, dict],
    trained: dict[str, list[str]] | None = None,
    blind: dict[str, float] | None = None,
    anchored: dict[str, list[str]] | None = None,
) -> str:
    """Markdown: ``| task | metric | blind | <label> ... | trained by |`` and the
    GRPO-objective table under it.

    ``trained``: ``{stage label: tasks it trained}``; ``blind``: ``{task: headline metric of an
    answer that ignores the image}`` (``geovlm.heldout.blind_baseline``); ``anchored``:
    ``{GRPO stage label: tasks its SFT anchor kept in its loss}`` (``geovlm.anchor``), named in
    the "trained by" column apart from the stages that rewarded the task.
    """
    trained, blind, anchored = trained or {}, blind or {}, anchored or {}
    labels = list(summaries)
    tasks = [t for t in registry.names() if any(t in s for s in summaries.values())]
    bold = _marked(summaries, trained)
    lines = [
        "| task | metric | blind | " + " | ".join(labels) + " | trained by |",
        "|---|---|---|" + "---|" * len(labels) + "---|",
    ]
    for task in tasks:
        metrics = list(dict.fromkeys(m for s in summaries.values() for m in s.get(task, {})))
        by = ", ".join(label for label in labels if task in trained.get(label, ()))
        kept = [label for label in labels if task in anchored.get(label, ())]
        if kept:
            by += f"; SFT anchor in {', '.join(kept)}"
        for row, metric in enumerate(metrics):
            cells = []
            for label in labels:
                value = summaries[label].get(task, {}).get(metric)
                text = "-" if value is None else f"{value:.3f}"
                cells.append(f"**{text}**" if value is not None and task in bold[label] else text)
            base = f"{blind[task]:.3f}" if row == 0 and task in blind else ""
            stages = by if row == 0 else ""
            lines.append(f"| {task} | {metric} | {base} | " + " | ".join(cells) + f" | {stages} |")
    table = "\n".join(lines)
    notes = []
    if any(bold.values()):
        notes.append("**bold**: after a stage that trained the task (stages that trained every "
                     "task, such as SFT, are left plain).")
    if any(anchored.values()):
        notes.append(ANCHOR_NOTE)
    if blind:
        notes.append(BLIND_NOTE)
    if notes:
        table += "\n\n" + " ".join(notes)
    rows = [
        f"| {name} | {', '.join(o['tasks'])} | {o['prompts']} | {o['before']['reward']:.3f} | "
        f"{o['after']['reward']:.3f} | {o['before'].get('reward/accuracy', 0):.3f} -> "
        f"{o['after'].get('reward/accuracy', 0):.3f} |"
        for name, o in objective.items()
        if o
    ]
    if rows:
        table += (
            "\n\nGRPO objective on held-out prompts (mean reward of sampled completions):\n\n"
            "| stage | tasks | prompts | reward before | reward after | accuracy reward |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows)
        )
    return table


def log_heldout(
    trackers: Trackers, label: str, summaries: dict[str, dict], objective: dict[str, dict]
) -> None:
    """Send the held-out table after ``label`` (its scalars, and the Markdown tables of
    ``summary_table`` so far) to the run's trackers."""
    if label in summaries:
        trackers.log_heldout(label, summaries, summary_table(summaries, objective))


def write_summary(
    run_dir: Path,
    summaries: dict[str, dict[str, dict[str, float]]],
    objective: dict[str, dict],
    seconds: float,
    trained: dict[str, list[str]] | None = None,
    blind: dict[str, float] | None = None,
    vision_pretrain: dict[str, float] | None = None,
    anchored: dict[str, list[str]] | None = None,
) -> str:
    """Write ``summary.md`` and ``summary.json``; returns the Markdown tables.

    ``vision_pretrain``: the scores ``geovlm.vision_pretrain.pretrain_vision_tower`` returned
    (``init_<score>`` before, ``<score>`` after), shown as a table of their own."""
    table = summary_table(summaries, objective, trained, blind, anchored)
    if vision_pretrain:
        table += "\n\n" + vision_pretrain_table(vision_pretrain)
    (run_dir / "summary.md").write_text(table + f"\n\nwall time: {seconds:.0f} s\n")
    payload = {
        "held_out": summaries,
        "blind": blind or {},
        "trained": trained or {},
        "anchored": anchored or {},
        "grpo_objective": objective,
        "vision_pretrain": vision_pretrain or {},
    }
    (run_dir / "summary.json").write_text(json.dumps(payload, indent=2))
    return table


# The read-outs of the tower's pretraining, in the order and words summary.md gives them.
VISION_PRETRAIN_SCORES: tuple[tuple[str, str], ...] = (
    ("class_f1", "object classes per token, F1"),
    ("box_l1", "largest object's box, L1 (fraction of the side)"),
    ("position_acc", "token's own row and column, accuracy"),
    ("cover_acc", "land cover, accuracy"),
)


def vision_pretrain_table(scores: dict[str, float]) -> str:
    """Markdown table of the tower's read-out scores before and after its pretraining (held-out
    val scenes); scores it lacks are left out."""
    rows = [
        f"| {words} | {scores[f'init_{key}']:.3f} | {scores[key]:.3f} |"
        for key, words in VISION_PRETRAIN_SCORES
        if key in scores and f"init_{key}" in scores
    ]
    return (
        "Vision tower pretraining (linear read-outs of its image tokens, held-out val scenes):\n\n"
        "| read-out | untrained | pretrained |\n|---|---|---|\n" + "\n".join(rows)
    )


def draw_plots(
    run_dir: Path,
    records: list[dict],
    summaries: dict[str, dict[str, dict[str, float]]] | None = None,
    trained: dict[str, list[str]] | None = None,
    blind: dict[str, float] | None = None,
) -> None:
    """Redraw ``training_curves.png`` from the run's metric records and ``held_out.png`` from
    the held-out summaries so far."""
    from geovlm.plots import plot_held_out, plot_training_curves

    plot_training_curves(records, run_dir / "training_curves.png")
    if summaries:
        plot_held_out(summaries, trained or {}, blind or {}, run_dir / "held_out.png")
