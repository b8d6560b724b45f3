"""The run's plots: training curves from ``metrics.jsonl`` and the held-out metric per stage.

* ``plot_training_curves``: one row of panels per stage kind (SFT, GRPO), one line per stage
  (noisy metrics: a running mean over the faint per-step values once a stage has 20 points or
  more). A panel
  whose metric never changes (a constant learning rate, a clip ratio that stays 0) is left out:
  it says nothing and takes the room of one that does.
* ``plot_held_out``: one panel per task, its held-out headline metric (and any secondary metric
  the summary reports) after every stage, ``init`` first; the stages that trained the task are
  marked, and the image-blind baseline is drawn where the summary has one.
"""

from __future__ import annotations

import math
from pathlib import Path

# Panels per stage kind: (metric key, title, y-axis label, smoothed). Drawn only where some record
# of that kind has the key and its values are not all the same. A smoothed panel shows a running
# mean over the faint per-step values (those of small batches are noisy); a schedule is exact.
PANELS: dict[str, list[tuple[str, str, str, bool]]] = {
    "sft": [
        ("loss", "SFT loss (assistant tokens)", "NLL (nats / token)", True),
        ("val_loss", "SFT validation loss", "NLL (nats / token)", False),
        ("lr", "learning rate", "learning rate", False),
    ],
    "grpo": [
        ("reward", "GRPO reward (mean)", "reward", True),
        ("reward/accuracy", "GRPO accuracy reward (mean)", "accuracy reward", True),
        ("kl", "KL to reference", "KL (nats / token)", True),
        ("anchor_nll", "SFT anchor loss (other tasks)", "NLL (nats / token)", True),
        ("completion_length", "completion length", "tokens", True),
        ("clip_ratio", "clip ratio", "fraction of tokens", True),
        ("zero_std_frac", "groups with zero reward std", "fraction of groups", True),
    ],
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], kind: str, key: str) -> dict[str, list[tuple[float, float]]]:
    """``{stage: [(step, value), ...]}`` of ``key`` over the records of ``kind``, finite values."""
    out: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        value = record.get(key)
        if record.get("kind") != kind or not isinstance(value, int | float):
            continue
        if isinstance(value, bool) or not math.isfinite(value):
            continue
        out.setdefault(record["stage"], []).append((record["step"], float(value)))
    return out


def _worth_drawing(series: dict[str, list[tuple[float, float]]]) -> bool:
    """Logged, and not the same value at every one of two or more steps."""
    values = [v for points in series.values() for _, v in points]
    if len(values) < 2:
        return bool(values)
    return max(values) - min(values) > 1e-12 * max(1.0, abs(values[0]))


def smoothing_window(n_points: int) -> int:
    """Steps per running mean of a curve of ``n_points``: 1 (raw) below 20 points."""
    return 1 if n_points < 20 else max(3, n_points // 15) | 1


def running_mean(values: list[float] | tuple[float, ...], window: int) -> list[float]:
    """Centred mean of ``window`` (odd) values at each point; the window shrinks at the ends
    so that the curve neither lags the data nor loses its first and last steps."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        out.append(sum(part) / len(part))
    return out


def training_panels(records: list[dict]) -> list[tuple[str, list[tuple[str, str, str, bool]]]]:
    """The rows ``(kind, panels)`` that ``plot_training_curves`` draws: the panels of ``PANELS``
    whose metric was logged and changes (a single logged step is drawn too)."""
    rows = []
    for kind, panels in PANELS.items():
        present = [p for p in panels if _worth_drawing(_series(records, kind, p[0]))]
        if present:
            rows.append((kind, present))
    return rows


def plot_training_curves(records: list[dict], path: Path) -> Path | None:
    """Draw every stage's curves into ``path``; returns the path, or None if nothing to plot."""
    rows = training_panels(records)
    if not rows:
        return None
    plt = _pyplot()
    ncols = max(len(p) for _, p in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(4.2 * ncols, 3.2 * len(rows)), squeeze=False
    )
    for row, (kind, panels) in enumerate(rows):
        for col in range(ncols):
            ax = axes[row][col]
            if col >= len(panels):
                ax.axis("off")
                continue
            key, title, ylabel, smoothed = panels[col]
            series = _series(records, kind, key)
            for j, (stage, points) in enumerate(series.items()):
                xs, ys = zip(*points, strict=True)
                window = smoothing_window(len(points)) if smoothed else 1
                if window > 1:
                    # Per-step values of small batches are noisy: faint, under their running mean.
                    ax.plot(xs, ys, color=f"C{j}", alpha=0.25, linewidth=0.8)
                    ax.plot(xs, running_mean(ys, window), color=f"C{j}",
                            label=f"{stage} (mean of {window})")
                else:
                    marker = "." if len(points) < 30 else None
                    ax.plot(xs, ys, color=f"C{j}", marker=marker, label=stage)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(series) > 1:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_held_out(
    summaries: dict[str, dict[str, dict[str, float]]],
    trained: dict[str, list[str]],
    blind: dict[str, float],
    path: Path,
) -> Path | None:
    """One panel per task: its held-out metrics after every stage; returns the path, or None.

    ``summaries``: ``{stage label: {task: {metric: value}}}`` in stage order (``init`` first),
    the task's headline metric first; ``trained``: ``{stage label: tasks it trained}``
    (those points are drawn filled); ``blind``: ``{task: the
    headline metric of answers that ignore the image}`` (``geovlm.heldout.blind_baseline``).
    """
    labels = list(summaries)
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s))
    if not labels or not tasks:
        return None
    plt = _pyplot()
    ncols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    xs = list(range(len(labels)))
    for i, task in enumerate(tasks):
        ax = axes[i // ncols][i % ncols]
        metrics = list(dict.fromkeys(m for s in summaries.values() for m in s.get(task, {})))
        for j, metric in enumerate(metrics):
            points = [
                (x, summaries[label][task][metric])
                for x, label in zip(xs, labels, strict=True)
                if metric in summaries[label].get(task, {})
            ]
            color = f"C{j}"
            ax.plot(*zip(*points, strict=True), color=color, linestyle="-" if j == 0 else "--",
                    label=metric)
            for x, value in points:
                filled = task in trained.get(labels[x], ())
                ax.plot(x, value, "o", color=color, markerfacecolor=color if filled else "white")
        if task in blind:
            ax.axhline(blind[task], color="gray", linestyle=":", label="blind")
        values = [v for s in summaries.values() for v in s.get(task, {}).values()]
        if all(0.0 <= v <= 1.0 for v in values):
            # Rates and scores: one scale for every panel, so that the size of a change reads.
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel(metrics[0] if metrics else "")
        ax.grid(alpha=0.3)
        if len(metrics) > 1 or task in blind:
            ax.legend(fontsize=7)
    for i in range(len(tasks), nrows * ncols):
        axes[i // ncols][i % ncols].axis("off")
    for i in range(len(tasks)):
        ax = axes[i // ncols][i % ncols]
        # Stage names under the lowest panel of each column only.
        lowest = i + ncols >= len(tasks)
        ax.set_xticks(xs, labels if lowest else [], rotation=30, ha="right", fontsize=8)
    fig.suptitle(
        "held-out metric after each stage (filled: the stage trained the task)", fontsize=11
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
