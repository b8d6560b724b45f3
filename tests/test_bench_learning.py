"""``benchmarks/bench_learning.py``: the verdicts and the RESULTS.md table it derives from the
runs' summaries (fabricated summaries; the runs themselves are the bench's job)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling _provenance
    try:
        path = BENCHMARKS / "bench_learning.py"
        spec = importlib.util.spec_from_file_location("bench_learning", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_compare_improves_only_beyond_the_spread(bench):
    clear = bench.compare([0.20, 0.22, 0.24], [0.40, 0.41, 0.45])
    assert clear["verdict"] == "improves"
    assert clear["mean"] == pytest.approx(0.2) and clear["min"] == pytest.approx(0.19)
    # Every seed improves, but by less than the seed-to-seed sd of the metric.
    small = bench.compare([0.20, 0.40, 0.60], [0.21, 0.41, 0.61])
    assert small["verdict"] == "within spread"
    # One seed regresses: no verdict either way.
    mixed = bench.compare([0.20, 0.20, 0.20], [0.50, 0.50, 0.10])
    assert mixed["verdict"] == "within spread"
    assert bench.compare([0.5, 0.52, 0.5], [0.3, 0.31, 0.29])["verdict"] == "regresses"
    assert bench.compare([0.2], [0.5])["verdict"] == "one seed: no spread"


def _run(seed: int, sft: float, det: float, labels: float) -> dict:
    stages = [{"name": "sft", "kind": "sft"}, {"name": "grpo_det", "kind": "grpo"},
              {"name": "grpo_labels", "kind": "grpo"}]
    held_out = {
        "init": {"referred_det": {"acc@0.5": 0.0, "mean_iou": 0.0}, "vqa": {"accuracy": 0.3}},
        "sft": {"referred_det": {"acc@0.5": sft, "mean_iou": sft}, "vqa": {"accuracy": 0.6}},
        "grpo_det": {"referred_det": {"acc@0.5": det, "mean_iou": det}, "vqa": {"accuracy": 0.6}},
        "grpo_labels": {"referred_det": {"acc@0.5": det - 0.01, "mean_iou": det},
                        "vqa": {"accuracy": labels}},
    }
    trained = {"sft": ["referred_det", "vqa"], "grpo_det": ["referred_det"],
               "grpo_labels": ["vqa"]}
    return {"seed": seed, "seconds": 300.0 + seed, "load": ("1.0", "2.0"), "stages": stages,
            "held_out": held_out, "trained": trained, "blind": {"vqa": 0.5}}


def test_task_rows_pair_each_task_with_the_grpo_stage_that_trained_it(bench):
    runs = [_run(0, 0.20, 0.35, 0.70), _run(1, 0.22, 0.36, 0.72), _run(2, 0.24, 0.40, 0.71)]
    rows = {row["task"]: row for row in bench.task_rows(runs)}
    det, vqa = rows["referred_det"], rows["vqa"]
    assert det["trained_by"] == "grpo_det" and vqa["trained_by"] == "grpo_labels"
    assert det["metric"] == "acc@0.5" and det["blind"] is None and vqa["blind"] == 0.5
    assert det["sft"][0] == pytest.approx(0.22) and det["after"][0] == pytest.approx(0.37)
    assert det["change"]["verdict"] == "improves" and vqa["change"]["verdict"] == "improves"
    assert det["final"][0] == pytest.approx(0.36)  # after the last stage, grpo_labels

    table = bench.markdown(runs)
    line = next(row for row in table.splitlines() if row.startswith("| referred_det |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:5] == ["referred_det", "acc@0.5", "", "0.220 ± 0.020", "grpo_det"]
    assert cells[5] == "0.370 ± 0.026" and cells[6].endswith("improves")
    assert "| 2 | 302 s | 1.0 / 2.0 |" in table


def test_a_rerun_over_a_finished_run_reports_the_timing_of_the_run_that_trained_it(
    bench, tmp_path, monkeypatch
):
    run_dir = tmp_path / "seed-3"
    stages = [{"name": "sft", "kind": "sft"}, {"name": "grpo_labels", "kind": "grpo"}]
    calls = []

    def fake_train(command, cwd, check):
        # What a finished run leaves behind; stage 1's checkpoint only from the second call on.
        calls.append(command)
        run_dir.mkdir(exist_ok=True)
        (run_dir / "config.yaml").write_text(bench.yaml.safe_dump({"stages": stages}))
        (run_dir / "summary.json").write_text('{"held_out": {}}')
        for i, stage in enumerate(stages[: len(calls)]):
            final = run_dir / "stages" / f"{i}-{stage['name']}" / "final"
            final.mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(bench.subprocess, "run", fake_train)
    interrupted = bench.run_seed(3, tmp_path, [])
    assert not (run_dir / "bench_timing.json").exists()  # stage 1 unfinished: no timing kept
    finished = bench.run_seed(3, tmp_path, [])
    kept = bench.json.loads((run_dir / "bench_timing.json").read_text())
    assert kept["seconds"] == pytest.approx(finished["seconds"])
    assert interrupted["seconds"] >= 0
    # Pretend the finishing invocation took 20 minutes: a rerun reports those, not its own.
    (run_dir / "bench_timing.json").write_text('{"seconds": 1200.0, "load": ["1.5", "3.2"]}')
    rerun = bench.run_seed(3, tmp_path, [])
    assert len(calls) == 3
    assert rerun["seconds"] == 1200.0 and rerun["load"] == ("1.5", "3.2")
