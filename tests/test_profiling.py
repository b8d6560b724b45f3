"""Profiling: ``--profile`` writes a Chrome trace naming every phase; NVTX ranges pair up.

The oracle for the end-to-end trace is the algorithm itself: a GRPO step runs rollout, reward,
reference log-probs, old log-probs, then (loss, backward, optimizer) once per iteration, in
that order and without overlap; an SFT step runs forward, backward, optimizer.
"""

import json

import pytest
import torch

from geovlm import profiling
from geovlm.profiling import StepProfiler, nvtx_range
from geovlm.train import main

from .test_train import TINY

GRPO_ORDER = ["grpo/rollout", "grpo/reward", "grpo/ref_logps", "grpo/old_logps"]
GRPO_UPDATE = ["grpo/loss", "grpo/backward", "grpo/optimizer"]
# The default SFT step: the shared prefix split off (geovlm.sft_prefix), then the passes.
SFT_PHASES = ["sft/share_prefix", "sft/forward", "sft/backward", "sft/optimizer"]


def annotations(path):
    """``(name, start_us, end_us)`` of every user range in a Chrome trace, by start time."""
    trace = json.loads(path.read_text())
    events = [
        (e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        for e in trace["traceEvents"]
        if e.get("cat") == "user_annotation" and e.get("ph") == "X"
        and not e["name"].startswith("ProfilerStep#")
    ]
    return sorted(events, key=lambda e: e[1])


def test_profile_flag_writes_traces_naming_every_phase(tmp_path):
    stages = (
        "stages=[{name: sft, kind: sft, steps: 2, batch_size: 2, save_every: 0},"
        " {name: grpo, kind: grpo, tasks: [scene_cls, counting], steps: 2, batch_size: 2,"
        "  num_generations: 2, max_new_tokens: 4, save_every: 0, beta: 0.04,"
        "  num_iterations: 2}]"
    )
    argv = ["--profile", f"output_dir={tmp_path}", "name=prof", *TINY, stages]
    assert main(argv) == 0
    profile_dir = tmp_path / "prof" / "profile"
    assert sorted(p.name for p in profile_dir.iterdir()) == ["trace_grpo.json", "trace_sft.json"]

    sft = [name for name, _, _ in annotations(profile_dir / "trace_sft.json")]
    # The first step is the profiler's warm-up; the second is recorded.
    assert [n for n in sft if n.startswith("sft/")] == SFT_PHASES

    grpo = [e for e in annotations(profile_dir / "trace_grpo.json") if e[0].startswith("grpo/")]
    assert [name for name, _, _ in grpo] == GRPO_ORDER + GRPO_UPDATE * 2
    for (_, _, end), (_, start, _) in zip(grpo, grpo[1:], strict=False):
        assert end <= start, "phases of one step must not overlap"
    # The heavy work sits inside its range: generate's forward calls inside grpo/rollout.
    rollout = grpo[0]
    trace = json.loads((profile_dir / "trace_grpo.json").read_text())
    inside = [
        e for e in trace["traceEvents"]
        if e.get("ph") == "X" and e.get("cat") == "cpu_op" and e["name"] == "aten::linear"
        and rollout[1] <= float(e["ts"]) <= rollout[2]
    ]
    assert inside, "no aten::linear recorded inside grpo/rollout"
    # Its two parts: the prompts' prefill, then the decode steps.
    events = annotations(profile_dir / "trace_grpo.json")
    nested = [e for e in events if e[0].startswith("rollout/")]
    assert [name for name, _, _ in nested] == ["rollout/prefill", "rollout/decode"]
    assert all(rollout[1] <= start and end <= rollout[2] for _, start, end in nested)


def test_step_profiler_records_the_steps_after_warm_up(tmp_path):
    profiler = StepProfiler(tmp_path, "unit", enabled=True, wait=1, warmup=1, active=2)
    for step in range(5):
        profiler.step()
        with nvtx_range(f"step{step}"):
            torch.ones(8).sum()
    profiler.close()
    names = [name for name, _, _ in annotations(tmp_path / "trace_unit.json")]
    # step() at the top of each step: wait is spent before step 0, step 0 warms up, steps 1-2
    # are recorded, later steps are not.
    assert names == ["step1", "step2"]


def test_step_profiler_stopped_in_warm_up_says_so(tmp_path, capsys):
    profiler = StepProfiler(tmp_path, "short", enabled=True)
    profiler.step()
    profiler.close()
    assert not (tmp_path / "trace_short.json").exists()
    assert "no trace" in capsys.readouterr().err


def test_disabled_profiler_writes_nothing(tmp_path):
    profiler = StepProfiler(tmp_path / "profile", "off", enabled=False)
    for _ in range(6):
        profiler.step()
    profiler.close()
    assert not (tmp_path / "profile").exists()


class _FakeNvtx:
    def __init__(self):
        self.calls = []

    def range_push(self, name):
        self.calls.append(("push", name))

    def range_pop(self):
        self.calls.append(("pop", None))


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeNvtx()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(profiling.torch.cuda, "nvtx", fake)
    return fake


def test_nvtx_ranges_nest_and_pop_on_error(fake_cuda):
    with nvtx_range("grpo/loss"):
        with pytest.raises(ZeroDivisionError):
            with nvtx_range("inner"):
                raise ZeroDivisionError
    assert fake_cuda.calls == [
        ("push", "grpo/loss"), ("push", "inner"), ("pop", None), ("pop", None)
    ]


def test_no_nvtx_before_cuda_is_initialised(monkeypatch):
    fake = _FakeNvtx()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(profiling.torch.cuda, "nvtx", fake)
    with nvtx_range("grpo/rollout"):
        pass
    assert fake.calls == []
