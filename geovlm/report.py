"""The run's report: ``summary.md`` / ``summary.json`` and the plots, redrawn whenever a run ends,
and the held-out table sent to the experiment trackers after every evaluation.

``summary.md`` holds the headline metric of every task after every stage (columns in stage order,
``init`` first) and each GRPO stage's objective (mean sampled reward on held-out prompts) before
and after it; ``summary.json`` the same numbers as data; ``training_curves.png`` the curves of
``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from geovlm.tasks import registry

if TYPE_CHECKING:
    from geovlm.trackers import Trackers


def summary_table(summaries: dict[str, dict], objective: dict[str, dict]) -> str:
    """Markdown: ``| task | metric | <label> ... |`` and the GRPO-objective table under it."""
    labels = list(summaries)
    tasks = [t for t in registry.names() if any(t in s for s in summaries.values())]
    lines = [
        "| task | metric | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for task in tasks:
        metric = next(s[task][0] for s in summaries.values() if task in s)
        values = [
            f"{summaries[label][task][1]:.3f}" if task in summaries[label] else "-"
            for label in labels
        ]
        lines.append(f"| {task} | {metric} | " + " | ".join(values) + " |")
    table = "\n".join(lines)
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
    run_dir: Path, summaries: dict[str, dict], objective: dict[str, dict], seconds: float
) -> str:
    """Write ``summary.md`` and ``summary.json``; returns the Markdown tables."""
    table = summary_table(summaries, objective)
    (run_dir / "summary.md").write_text(table + f"\n\nwall time: {seconds:.0f} s\n")
    (run_dir / "summary.json").write_text(
        json.dumps({"held_out": summaries, "grpo_objective": objective}, indent=2)
    )
    return table


def draw_plots(run_dir: Path, records: list[dict]) -> None:
    """Redraw ``training_curves.png`` from the run's metric records."""
    from geovlm.plots import plot_training_curves

    plot_training_curves(records, run_dir / "training_curves.png")
