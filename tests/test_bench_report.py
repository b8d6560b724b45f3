"""``benchmarks/report.py`` (pytest-benchmark JSON -> RESULTS.md tables) on a fixture JSON, and the
whole path on a real pytest-benchmark run through ``benchmarks/_compare.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
FIXTURE = ROOT / "tests" / "fixtures" / "bench_report.json"


def _load_report():
    spec = importlib.util.spec_from_file_location("geovlm_bench_report", BENCHMARKS / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


report = _load_report()


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _table_rows(section: str) -> list[list[str]]:
    """The data rows of every table, as lists of cells."""
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| case |"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_tables_from_the_fixture():
    section = report.markdown(_fixture(), "fixture.json")
    assert section.startswith(report.BEGIN + "\n") and section.endswith(report.END + "\n")
    # One table per bench file, in run order.
    assert section.index("### bench_rewards_geometry.py") < section.index(
        "### bench_rewards_text.py")
    provenance = ["AMD EPYC 7B13, 2 cores", "2026-12-05", "0123456"]
    assert _table_rows(section) == [
        # One row per (ours, anchor) pair; ratio = ours median / anchor median.
        ["rotated iou_pairs", "10,000 pairs", "ours", "5.00 ms (4.00 ms)",
         "shapely prebuilt polygons", "250 ms (200 ms)", "0.0200", "2.5e-13", *provenance],
        ["rotated iou_pairs", "10,000 pairs", "ours", "5.00 ms (4.00 ms)",
         "shapely from [N,5] arrays", "350 ms (300 ms)", "0.0143", "2.5e-13", *provenance],
        # A group whose anchor was not run (pytest -k) says so instead of inventing a ratio.
        ["first_box_iou xyxy", "1,024 cands", "ours", "42.0 µs (40.0 µs)", "-", "not measured",
         "-", "-", *provenance],
        ["bleu (BLEU-1..4)", "1,024 x 5 refs (RSICD)", "ours cold", "4.50 ms (4.30 ms)",
         "pycocoevalcap Bleu(4)", "160 ms (155 ms)", "0.0281", "0", *provenance],
        ["bleu (BLEU-1..4)", "1,024 x 5 refs (RSICD)", "ours warm", "4.00 ms (3.90 ms)",
         "pycocoevalcap Bleu(4)", "160 ms (155 ms)", "0.0250", "4.4e-16", *provenance],
    ]
    assert "Load average 0.5-2.5" in section
    assert "torch threads 1; numba 0.68.1, shapely 2.2.0." in section


def test_machine_and_commit_fall_back_to_pytest_benchmarks_own_fields():
    data = _fixture()
    del data["machine_info"]["geovlm"]
    data["commit_info"]["dirty"] = True
    for bench in data["benchmarks"]:
        bench["extra_info"].pop("load")
    section = report.markdown(data, "fixture.json")
    assert _table_rows(section)[0][-3:] == ["AMD EPYC, 2 cores", "2026-12-05", "0123456+dirty"]
    assert "Load average n/a" in section


@pytest.mark.parametrize(("seconds", "text"), [
    (2.0, "2.00 s"), (0.99996, "1.00 s"), (0.2453, "245 ms"), (0.0054349, "5.43 ms"),
    (1.4497e-05, "14.5 µs"), (3.3e-07, "330 ns"),
])
def test_durations_keep_three_significant_digits(seconds, text):
    assert report.duration(seconds) == text


def test_update_replaces_only_the_generated_section(tmp_path):
    section = report.markdown(_fixture(), "fixture.json")
    results = tmp_path / "RESULTS.md"
    before, after = "# Benchmark results\n\nHand-written intro.\n\n", "\n## History\n\nrows\n"
    results.write_text(before + report.BEGIN + "\nstale tables\n" + report.END + "\n" + after)
    updated = report.update(results, section)
    assert updated == before + section + after
    results.write_text(updated)
    assert report.update(results, section) == updated  # idempotent


def test_update_appends_the_section_to_a_file_without_markers(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nhistory\n")
    section = report.markdown(_fixture(), "fixture.json")
    assert report.update(results, section) == "# Benchmark results\n\nhistory\n\n" + section


@pytest.mark.parametrize("text", [
    "only a begin\n" + "{begin}\n",
    "{end}\nthen\n{begin}\n",
    "{begin}\n{begin}\n{end}\n",
])
def test_update_refuses_broken_markers(tmp_path, text):
    results = tmp_path / "RESULTS.md"
    results.write_text(text.format(begin=report.BEGIN, end=report.END))
    with pytest.raises(ValueError, match="RESULTS.md: expected one"):
        report.update(results, "section\n")


def test_bad_json_is_a_clear_error(tmp_path):
    data = _fixture()
    del data["benchmarks"][1]["extra_info"]["role"]
    named = r"x.json: benchmark .*test_rotated_iou_pairs\[shapely prebuilt polygons\]: "
    with pytest.raises(ValueError, match=named + r"extra_info lacks \['role'\]"):
        report.markdown(data, "x.json")
    with pytest.raises(ValueError, match="x.json: no 'benchmarks' list"):
        report.markdown({"machine_info": {}}, "x.json")
    data = _fixture()
    data["benchmarks"].append(data["benchmarks"][0])
    with pytest.raises(ValueError, match="method 'ours' appears twice"):
        report.markdown(data, "x.json")
    path = tmp_path / "broken.json"
    path.write_text("{")
    assert report.main([str(path)]) == 1


# A bench module as benchmarks/ writes them: one group with a right answer, one with a wrong one.
BENCH_MODULE = textwrap.dedent('''
    import pytest
    from _compare import Case, anchor, close, ours, time_method

    DATA = list(range(2000, 0, -1))


    @pytest.fixture(scope="module")
    def sorting():
        return Case("sort", "2,000 ints", {
            "ours": ours(lambda: sorted(DATA)),
            "insertion": anchor(lambda: list(reversed(DATA))),
        }, close())


    @pytest.mark.parametrize("method", ["ours", "insertion"])
    def test_sort(benchmark, sorting, method):
        time_method(benchmark, sorting, method)


    @pytest.fixture(scope="module")
    def wrong():
        return Case("wrong", "3 ints", {
            "ours": ours(lambda: [1, 2, 4]),
            "python": anchor(lambda: [1, 2, 3]),
        }, close(atol=0.5))


    def test_wrong(benchmark, wrong):
        time_method(benchmark, wrong, "ours")
''')


def test_a_real_pytest_benchmark_run(tmp_path):
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "bench_sort.py").write_text(BENCH_MODULE)
    out = tmp_path / "out.json"
    # Not this run's PYTEST_* variables: under xdist, PYTEST_XDIST_WORKER would make
    # pytest-benchmark disable itself in the child.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCHMARKS), str(ROOT)])
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "bench_sort.py"), "-q",
         "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", str(tmp_path),
         f"--benchmark-json={out}", "--benchmark-min-rounds=3", "--benchmark-max-time=0.01"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    # The wrong answer fails before it is timed, naming the group and both methods.
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 2 passed" in run.stdout
    assert "wrong: ours disagrees with python: output 0: max abs difference 1.000e+00" in run.stdout
    data = json.loads(out.read_text())
    medians = {b["extra_info"]["method"]: b["stats"]["median"] for b in data["benchmarks"]}
    assert set(medians) == {"ours", "insertion"}
    rows = _table_rows(report.markdown(data, str(out)))
    assert len(rows) == 1
    assert rows[0][:3] == ["sort", "2,000 ints", "ours"]
    assert rows[0][4] == "insertion"
    assert rows[0][6] == report.significant(medians["ours"] / medians["insertion"])
    assert rows[0][7] == "0"  # ours agreed exactly with the reference anchor
