"""Does the default recipe learn? The embedded default run (``python -m geovlm.train``, preset
``tiny-cpu``) for several seeds, and what each GRPO stage does to the held-out metrics.

Run: ``python benchmarks/bench_learning.py [--seeds 0 1 2] [--output-dir DIR] [key=value ...]``
(overrides go to every run, e.g. ``eval.max_samples_per_task=30`` for a quick look).

Seed ``k`` runs the default recipe in its own process with ``seed=k data.seed=k``: its own
embedded world (train and held-out scenes), tokenizer, initialisation, data order and sampling.
Runs live in ``DIR/seed-<k>`` (default ``runs/bench-learning``) and are resumed when present, so
an interrupted bench continues where it stopped. Each run's ``summary.json`` gives the held-out
headline metric of every task after every stage.

Printed (Markdown, for benchmarks/RESULTS.md):

* per task: the headline metric after SFT, after the GRPO stage that trained the task and after
  the last stage, each as mean ± sd over the seeds; the paired changes Δ from SFT (same seed) as
  mean ± sd with their min..max; the image-blind baseline; a verdict per change: ``improves`` when
  every seed's Δ is positive and the mean Δ exceeds the seed-to-seed sd of both metrics,
  ``regresses`` when the mirror holds, else ``within spread`` (no verdict from one seed);
* the wall time of every run with the 1-minute load average at its start and end: of the
  invocation that finished the run (a rerun over a finished run reports it from
  ``seed-<k>/bench_timing.json``; a run resumed after an interruption, its last part only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _provenance  # benchmarks/_provenance.py: the script's directory is on sys.path
import yaml

ROOT = _provenance.ROOT


def run_seed(seed: int, output_dir: Path, overrides: list[str]) -> dict:
    """Run (or resume) the default recipe for ``seed``; its summary.json plus timing."""
    name = f"seed-{seed}"
    command = [
        sys.executable, "-m", "geovlm.train", "--existing-run", "resume",
        f"output_dir={output_dir}", f"name={name}", f"seed={seed}", f"data.seed={seed}",
        *overrides,
    ]
    # The timing of the invocation that trained the run: a rerun over a finished run only
    # re-reads it, and its few seconds are no wall time of the recipe.
    timing_file = output_dir / name / "bench_timing.json"
    finished = timing_file.exists() and _all_stages_final(output_dir / name)
    load_start = _provenance.load_text()
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    timing = {"seconds": time.perf_counter() - start, "load": [load_start, _provenance.load_text()]}
    if finished:
        timing = json.loads(timing_file.read_text())
    elif _all_stages_final(output_dir / name):
        timing_file.write_text(json.dumps(timing))
    summary = json.loads((output_dir / name / "summary.json").read_text())
    config = yaml.safe_load((output_dir / name / "config.yaml").read_text())
    stages = [{"name": s["name"], "kind": s["kind"]} for s in config["stages"]]
    return {"seed": seed, "seconds": timing["seconds"], "load": tuple(timing["load"]),
            "stages": stages, **summary}


def _all_stages_final(run_dir: Path) -> bool:
    """Whether every stage of the run in ``run_dir`` has its final checkpoint."""
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        return False
    stages = yaml.safe_load(config_file.read_text())["stages"]
    return all(
        (run_dir / "stages" / f"{i}-{s['name']}" / "final").is_dir() for i, s in enumerate(stages)
    )


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(before: list[float], after: list[float]) -> dict:
    """Paired change over seeds: Δ mean ± sd, its min..max, and the verdict (module docstring)."""
    deltas = [a - b for a, b in zip(after, before, strict=True)]
    mean, sd = _mean_sd(deltas)
    spread = max(_mean_sd(before)[1], _mean_sd(after)[1])
    if len(deltas) < 2:
        verdict = "one seed: no spread"
    elif min(deltas) > 0 and mean > spread:
        verdict = "improves"
    elif max(deltas) < 0 and -mean > spread:
        verdict = "regresses"
    else:
        verdict = "within spread"
    return {"mean": mean, "sd": sd, "min": min(deltas), "max": max(deltas), "verdict": verdict}


def task_rows(runs: list[dict]) -> list[dict]:
    """Per task: its headline metric after SFT, after the GRPO stage that trained it and after
    the last stage, over the seeds, with the paired changes from SFT."""
    stages = runs[0]["stages"]
    sft = [s["name"] for s in stages if s["kind"] == "sft"][-1]
    last = stages[-1]["name"]
    held_out = runs[0]["held_out"]
    rows = []
    for task, metrics in held_out[sft].items():
        metric = next(iter(metrics))

        def values(label: str, task=task, metric=metric) -> list[float]:
            return [r["held_out"][label][task][metric] for r in runs]

        grpo = [s["name"] for s in stages
                if s["kind"] == "grpo" and task in runs[0]["trained"].get(s["name"], ())]
        # "majority": the label-task baseline's name in runs before the box prior joined it.
        baselines = [r.get("blind", r.get("majority", {})) for r in runs]
        blind = [b[task] for b in baselines if task in b]
        row = {
            "task": task,
            "metric": metric,
            "blind": statistics.fmean(blind) if blind else None,
            "sft": _mean_sd(values(sft)),
            "final": _mean_sd(values(last)),
            "final_change": compare(values(sft), values(last)),
            "trained_by": grpo[-1] if grpo else None,
        }
        if grpo:
            row["after"] = _mean_sd(values(grpo[-1]))
            row["change"] = compare(values(sft), values(grpo[-1]))
        rows.append(row)
    return rows


def _pm(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def _change(change: dict) -> str:
    low, high = change["min"], change["max"]
    return (f"{change['mean']:+.3f} ± {change['sd']:.3f} ({low:+.3f}..{high:+.3f}) "
            f"{change['verdict']}")


def markdown(runs: list[dict]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [
        f"{_provenance.cpu()}, {datetime.date.today()}, commit {_provenance.commit()}, "
        f"seeds {seeds} (seed = data.seed = k); mean ± sd over seeds; Δ paired by seed "
        "(min..max)",
        "",
        "| task | metric | blind | SFT | GRPO stage | after it | Δ | final | Δ final |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in task_rows(runs):
        blind = "" if row["blind"] is None else f"{row['blind']:.3f}"
        own = [row["trained_by"], _pm(row["after"]), _change(row["change"])] if row["trained_by"] \
            else ["-", "", ""]
        lines.append(
            f"| {row['task']} | {row['metric']} | {blind} | {_pm(row['sft'])} | "
            + " | ".join(own)
            + f" | {_pm(row['final'])} | {_change(row['final_change'])} |"
        )
    lines += ["", "| seed | wall time | load average (start / end) |", "|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['seconds']:.0f} s | {r['load'][0]} / {r['load'][1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "bench-learning")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    runs = [run_seed(seed, args.output_dir.resolve(), args.overrides) for seed in args.seeds]
    print("\n" + markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
