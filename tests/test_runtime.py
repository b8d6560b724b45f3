"""geovlm.runtime's CPU accounting: how many threads a process takes on a shared machine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from geovlm import runtime
from geovlm.runtime import RuntimeSetupError, busy_cpus, cgroup_cpu_quota, cpu_threads


def _stat(rows: dict[int, tuple[int, int]]) -> str:
    """A /proc/stat text: cpuN lines with (busy user ticks, idle ticks), plus the lines around."""
    lines = ["cpu  999 0 0 999 0 0 0 0 0 0"]
    lines += [f"cpu{n} {user} 0 0 {idle} 0 0 0 0 0 0" for n, (user, idle) in rows.items()]
    lines += ["intr 1 2 3", "procs_running 3"]
    return "\n".join(lines) + "\n"


def test_busy_cpus_reads_the_usable_cpus_non_idle_share(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(_stat({0: (100, 100), 1: (100, 100), 2: (100, 100)}))
    # Over the interval cpu0 is busy throughout, cpu1 a quarter of the time, cpu2 (not ours)
    # throughout.
    later = _stat({0: (200, 100), 1: (125, 175), 2: (200, 100)})
    monkeypatch.setattr(runtime.time, "sleep", lambda _: stat.write_text(later))
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _: {0, 1})
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    assert busy_cpus(stat=stat) == pytest.approx((1.0 + 0.25) / 2 * 2)


def test_busy_cpus_is_none_without_proc_stat(tmp_path):
    assert busy_cpus(interval=0.0, stat=tmp_path / "missing") is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux /proc/stat")
def test_busy_cpus_sees_a_process_that_just_started():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        # Whatever else runs on the machine, the spinner alone keeps one CPU busy.
        assert busy_cpus(interval=0.5) >= 0.8
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize(
    "busy, sharing, usable, want",
    [
        (0.0, 1, 2, 2),  # a quiet machine: every usable CPU
        (0.6, 1, 2, 1),  # one CPU mostly taken by another process
        (1.4, 1, 2, 1),
        (3.0, 1, 2, 1),  # overloaded: still one thread
        (1.0, 2, 2, 1),  # two xdist workers: the sibling's CPU is not "elsewhere"
        (0.0, 2, 8, 4),
        (3.0, 2, 8, 3),
    ],
)
def test_cpu_threads_share_what_is_free(monkeypatch, busy, sharing, usable, want):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: usable)
    monkeypatch.setattr(runtime, "processes_sharing_cpus", lambda: sharing)
    assert cpu_threads(busy=busy) == want


def test_requested_threads_win_and_are_checked():
    assert cpu_threads(3, busy=10.0) == 3
    with pytest.raises(RuntimeSetupError, match="threads must be >= 1"):
        cpu_threads(0)


def test_processes_sharing_cpus_counts_ranks_and_xdist_workers(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    assert runtime.processes_sharing_cpus() == 6


@pytest.mark.parametrize(
    "files, want",
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_v1_and_v2(tmp_path, files, want):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == want
