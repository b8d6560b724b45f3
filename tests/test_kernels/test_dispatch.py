"""One dispatch rule and one reading of ``TRITON_INTERPRET`` for every op.

Each value of the variable is tried in a fresh process (Triton reads it when the package is
imported): "1" and "true" both put every kernel under the interpreter, with its single small
config, and let ``backend="triton"`` run both ops on CPU tensors; "0" and "" leave the compiled
kernels, which refuse CPU tensors with an error that names the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from geovlm.kernels import _dispatch, linear_selective_log_softmax, selective_log_softmax
from geovlm.kernels.logprobs import _logsoftmax_fwd_kernel

PROBE = textwrap.dedent('''
    import json, torch
    from geovlm.kernels import _dispatch, linear_logprobs, logprobs
    from geovlm.kernels import linear_selective_log_softmax, reference, selective_log_softmax

    kernels = (logprobs._logsoftmax_fwd_kernel, logprobs._grad_logits_kernel,
               linear_logprobs._forward_chunk_kernel, linear_logprobs._grad_logits_chunk_kernel)
    out = {"interpreting": _dispatch.interpreting(),
           "kernels": [_dispatch.is_interpreted(k) for k in kernels],
           "configs": [len(k.configs) for k in kernels]}
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 3, 40, generator=g), torch.randint(0, 40, (2, 3), generator=g)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    calls = {
        "logits": (lambda: selective_log_softmax(logits, ids, backend="triton"),
                   lambda: reference.selective_log_softmax(logits.double(), ids)),
        "linear": (lambda: linear_selective_log_softmax(hidden, weight, ids.view(-1),
                                                        backend="triton"),
                   lambda: reference.selective_log_softmax(
                       reference.linear_logits(hidden.double(), weight.double()), ids.view(-1))),
    }
    for name, (ours, spec) in calls.items():
        try:
            out[name] = (ours().double() - spec()).abs().max().item()
        except ValueError as err:
            out[name] = str(err)
    print(json.dumps(out))
''')


def _probe(value: str) -> subprocess.Popen:
    env = {**os.environ, "TRITON_INTERPRET": value}
    return subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_triton_interpret_is_read_once_and_the_same_way_for_every_op():
    values = ("1", "true", "0", "")
    runs = {value: _probe(value) for value in values}  # in parallel: each imports torch
    for value, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, (value, stderr[-3000:])
        out = json.loads(stdout)
        on = value in ("1", "true")
        assert out["interpreting"] is on, value
        assert out["kernels"] == [on] * 4, value
        # Under the interpreter a single small config per kernel; the compiled kernels carry
        # their GPU candidates (the linear ones for two K-tile widths).
        assert out["configs"] == ([1, 1, 1, 1] if on else [6, 6, 10, 10]), value
        for op in ("logits", "linear"):
            if on:
                assert isinstance(out[op], float) and out[op] < 1e-5, (value, op, out[op])
            else:
                assert "needs CUDA tensors" in out[op] and "TRITON_INTERPRET" in out[op], value


def test_auto_sends_cpu_and_fp64_to_the_spec():
    logits = torch.randn(2, 3, 40)
    assert not _dispatch.use_triton("auto", logits, _logsoftmax_fwd_kernel)
    assert not _dispatch.use_triton("torch", logits, _logsoftmax_fwd_kernel)
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.use_triton("cuda", logits, _logsoftmax_fwd_kernel)
    if _dispatch.is_interpreted(_logsoftmax_fwd_kernel):
        assert _dispatch.use_triton("triton", logits, _logsoftmax_fwd_kernel)
        # The kernels load bf16 / fp16 / fp32; fp64 is the spec's, exactly.
        with pytest.raises(ValueError, match="float64"):
            _dispatch.use_triton("triton", logits.double(), _logsoftmax_fwd_kernel)
        ids = torch.randint(0, 40, (2, 3))
        with pytest.raises(ValueError, match="float64"):
            selective_log_softmax(logits.double(), ids, backend="triton")
        with pytest.raises(ValueError, match="float64"):
            linear_selective_log_softmax(torch.randn(6, 8, dtype=torch.float64),
                                         torch.randn(40, 8, dtype=torch.float64),
                                         ids.view(-1), backend="triton")


def test_row_chunks_cover_the_rows_within_the_budget(monkeypatch):
    monkeypatch.setattr(_dispatch, "CHUNK_ELEMENTS", 100)
    chunks = list(_dispatch.row_chunks(23, 30))
    assert [(c.start, c.stop) for c in chunks] == [(i, min(i + 3, 23)) for i in range(0, 23, 3)]
    # A row wider than the budget still makes progress, one row at a time.
    assert len(list(_dispatch.row_chunks(5, 1000))) == 5
    assert list(_dispatch.row_chunks(0, 30)) == []
