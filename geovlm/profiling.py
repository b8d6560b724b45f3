"""Named phases for profilers: NVTX ranges (Nsight Systems) and torch.profiler labels.

``nvtx_range("grpo/rollout")`` marks a phase in both an ``nsys profile -t cuda,nvtx`` timeline
(on CUDA) and a ``torch.profiler`` trace (CPU or CUDA), so the same names show up everywhere.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def nvtx_range(name: str):
    """Mark ``name`` for Nsight Systems (when CUDA is up) and for torch.profiler."""
    use_nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()


class StepProfiler:
    """``--profile``: a torch.profiler trace of a few steps, written as Chrome-trace JSON.

    Skips ``wait`` steps, warms up for ``warmup``, records ``active`` steps, then writes
    ``<out_dir>/trace_<stage>.json`` (open in Perfetto or chrome://tracing).
    """

    def __init__(
        self,
        out_dir: Path,
        stage: str,
        enabled: bool,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / f"trace_{stage}.json"
        self._prof = None
        # step() runs at the top of every step, so step index wait + warmup - 1 is recorded first.
        self._first_recorded = max(wait + warmup - 1, 0)
        if enabled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                on_trace_ready=lambda p: p.export_chrome_trace(str(self.path)),
                record_shapes=False,
            )
            self._prof.__enter__()

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
            if not self.path.is_file():
                # The stage ended before the first recorded step: torch writes no trace then.
                print(
                    f"profile: no trace for {self.path.stem}: the stage ended during the "
                    f"profiler's warm-up (profile at least {self._first_recorded + 1} steps)",
                    file=sys.stderr,
                    flush=True,
                )
