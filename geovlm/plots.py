"""Training-curve plots from ``metrics.jsonl`` (one PNG, one row of panels per stage kind)."""

from __future__ import annotations

from pathlib import Path

# Panels per stage kind: (metric key, title). A panel is drawn only if some record has the key.
PANELS = {
    "sft": [
        ("loss", "SFT loss (assistant tokens)"),
        ("val_loss", "SFT validation loss"),
        ("lr", "learning rate"),
    ],
    "grpo": [
        ("reward", "GRPO reward (mean)"),
        ("kl", "KL to reference"),
        ("completion_length", "completion length"),
        ("clip_ratio", "clip ratio"),
        ("zero_std_frac", "groups with zero reward std"),
    ],
}


def plot_training_curves(records: list[dict], path: Path) -> Path | None:
    """Draw every stage's curves into ``path``; returns the path, or None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for kind, panels in PANELS.items():
        present = [
            (k, t) for k, t in panels if any(r.get("kind") == kind and k in r for r in records)
        ]
        if present:
            rows.append((kind, present))
    if not rows:
        return None
    ncols = max(len(p) for _, p in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(4.2 * ncols, 3.2 * len(rows)), squeeze=False
    )
    for row, (kind, panels) in enumerate(rows):
        stages = list(dict.fromkeys(r["stage"] for r in records if r.get("kind") == kind))
        for col in range(ncols):
            ax = axes[row][col]
            if col >= len(panels):
                ax.axis("off")
                continue
            key, title = panels[col]
            for stage in stages:
                pts = [
                    (r["step"], r[key])
                    for r in records
                    if r.get("stage") == stage and key in r and r[key] is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=stage)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(stages) > 1:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
