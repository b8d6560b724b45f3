"""Every Triton kernel of ``geovlm.kernels`` compiles for the GPUs it targets -- A100 (sm_80) and
H100 (sm_90) -- on a machine without a GPU, within each card's shared memory per block.

The rest of the suite runs the kernels through Triton's interpreter, which executes them with
numpy and so cannot see what only compilation sees: lowering and ptxas errors, a tile whose
pipeline buffers overflow shared memory, a constexpr branch no test reaches. The compilations run
in a subprocess with ``TRITON_INTERPRET`` unset (``_compile_worker``'s docstring says why), which
imports the package exactly as a GPU run does.

The default suite compiles a representative subset (each kernel at its biggest tile, every branch
on, on the tightest card for its dtype) and checks that the logits kernels move 16-byte vectors.
``make compile-check`` (``pytest -m compile_matrix``) compiles the whole launch matrix: every
autotune config the autotuner can try, for bf16, fp16 and fp32, every constexpr branch, both cards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from geovlm.kernels import linear_logprobs

ROOT = Path(__file__).resolve().parents[2]
# Shared memory one block may use: A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _compile(matrix: str, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.test_kernels._compile_worker", matrix],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if "No module named 'triton.backends.nvidia'" in run.stderr:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def _describe(record: dict) -> str:
    return (f"{record['kernel']} sm_{record['arch']} {record['dtype']} {record['config']} "
            f"{record['constexprs']}")


def _check(result: dict) -> list[dict]:
    assert result["kernels"] == result["covered"], "a kernel has no launch spec in the worker"
    records = result["records"]
    errors = [f"{_describe(r)}: {r['error']}" for r in records if "error" in r]
    assert not errors, "\n".join(errors[:5])
    over = [f"{_describe(r)}: {r['shared']} B > {SHARED_LIMIT[r['arch']]} B" for r in records
            if r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not over, "\n".join(over[:10])
    return records


def test_representative_kernels_compile_for_a100_and_h100():
    result = _compile("subset", timeout=900)
    records = _check(result)
    assert {r["kernel"] for r in records} == set(result["covered"])
    for r in records:
        # With 16-divisible strides the logits move in 16-byte vectors (the backward also
        # writes its gradient so); the matmul kernels load through shared memory instead.
        if r["kernel"] == "_logsoftmax_fwd_kernel":
            assert "ld.global.v4.b32" in r["vectors"], _describe(r)
        if r["kernel"] == "_grad_logits_kernel":
            assert r["vectors"] == ["ld.global.v4.b32", "st.global.v4.b32"], _describe(r)


@pytest.mark.compile_matrix
def test_every_kernel_config_compiles_for_a100_and_h100():
    records = _check(_compile("full", timeout=4 * 3600))
    linear = [r for r in records if r["kernel"] in ("_forward_chunk_kernel",
                                                    "_grad_logits_chunk_kernel")]
    # The autotuner only tries the configs pruned to the dtype: 128-byte K tiles.
    itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}
    assert all(r["config"]["BLOCK_K"] * itemsize[r["dtype"]] == 128 for r in linear)
    counts = {(r["kernel"], r["arch"]): 0 for r in records}
    for r in records:
        counts[r["kernel"], r["arch"]] += 1
    print("compiled:", counts, "max shared:", {arch: max(r["shared"] for r in records
                                                         if r["arch"] == arch)
                                               for arch in SHARED_LIMIT})


@pytest.mark.parametrize(
    "dtype,block_k", [(torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 32)]
)
def test_linear_configs_are_pruned_to_128_byte_k_tiles(dtype, block_k):
    """The autotuner of the linear kernels tries only the tiles whose K slice is 128 bytes for the
    activations' dtype: fp32 tiles with BLOCK_K = 64 would need up to 320 KB of shared memory."""
    configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8})
               for bk in (8, 32, 64) for bn in (64, 256)]
    kept = linear_logprobs.prune_to_dtype(configs, {"h_ptr": torch.empty(0, dtype=dtype)})
    assert [c.kwargs["BLOCK_K"] for c in kept] == [block_k, block_k]
    assert [c.kwargs["BLOCK_N"] for c in kept] == [64, 256]
    with pytest.raises(ValueError, match="8-byte"):
        linear_logprobs.prune_to_dtype(configs, {"h_ptr": torch.empty(0, dtype=torch.float64)})
