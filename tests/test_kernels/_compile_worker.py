"""Compile the Triton kernels of ``geovlm.kernels`` for NVIDIA targets, without a GPU.

    python -m tests.test_kernels._compile_worker {subset,full} [--jobs N]

prints one JSON list: a record per compilation (kernel, target, dtype, config, constexpr branch,
the shared memory it needs, PTX vector loads / stores, or the error). ``test_compile.py`` runs it.

It must run in its own process with ``TRITON_INTERPRET`` unset: Triton decides when
``geovlm.kernels`` is imported whether ``triton.jit`` builds compilable ``JITFunction``s or CPU
``InterpretedFunction``s, and which autotune configs the kernels carry (``_dispatch``), while the
test suite turns the interpreter on for the whole pytest process on machines without a GPU. A
fresh interpreter-free process sees exactly the kernels and configs a GPU run would.

The launch matrix (``KERNELS``): for each kernel, every autotune config the autotuner can try for
the dtype (after the kernel's own ``early_config_prune``), every dtype it is launched with
(``_dispatch.TRITON_DTYPES``), and every constexpr branch its launcher can pass. The arguments
are specialised as Triton specialises a launch on a real model: integers get the types a large
launch gives them (i64 strides where rows can pass 2**31 elements), the unit strides of
contiguous rows are the constant 1, and pointers (torch allocations), hidden sizes, vocab sizes
and row strides are 16-divisible. That is also the specialisation that needs the most shared
memory: only with contiguous, aligned rows does Triton pipeline the matmul loads through
``cp.async`` buffers. Compiling needs only Triton's bundled ptxas, no driver.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

TARGETS = (80, 90)  # A100, H100
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_VECTOR_OPS = re.compile(r"(?:ld|st)[.]global[.]v4[.]b32")


@dataclass(frozen=True)
class KernelSpec:
    """How a kernel is launched: the Triton types of its runtime arguments for an input dtype,
    its constexpr branches (not those its autotune configs set) and which combinations occur."""

    module: str
    name: str
    signature: Callable[[str], dict[str, str]]
    branches: Callable[[str], dict[str, tuple]]
    aligned: tuple[str, ...]
    unit: tuple[str, ...] = ()  # integer arguments that are 1 (Triton makes them constants)
    launchable: Callable[[dict], bool] = lambda constexprs: True


def _logits_fwd_signature(dt: str) -> dict[str, str]:
    return dict(logits_ptr=f"*{dt}", ids_ptr="*i64", mask_ptr="*u8", logp_ptr="*fp32",
                max_ptr="*fp32", logsum_ptr="*fp32", entropy_ptr="*fp32", seq_len="i32",
                vocab="i32", stride_lb="i64", stride_lt="i64", stride_ib="i64", stride_mb="i64",
                inv_temperature="fp32")


def _logits_bwd_signature(dt: str) -> dict[str, str]:
    return dict(logits_ptr=f"*{dt}", grad_ptr=f"*{dt}", ids_ptr="*i64", g_ptr="*fp32",
                max_ptr="*fp32", logsum_ptr="*fp32", seq_len="i32", n_pos="i32", vocab="i32",
                stride_lb="i64", stride_lt="i64", stride_gb="i64", stride_gt="i64",
                stride_ib="i64", inv_temperature="fp32")


def _linear_fwd_signature(dt: str) -> dict[str, str]:
    return dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", ids_ptr="*i64",
                pmax_ptr="*fp32", psum_ptr="*fp32", pdot_ptr="*fp32", tgt_ptr="*fp32",
                N="i32", H="i32", v0="i32", VC="i32", stride_hn="i64", stride_wv="i64",
                inv_temp="fp32")


def _linear_bwd_signature(dt: str) -> dict[str, str]:
    return dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", ids_ptr="*i64",
                lse_ptr="*fp32", glogp_ptr="*fp32", gent_ptr="*fp32", mean_ptr="*fp32",
                g_ptr=f"*{dt}", gbias_ptr="*fp32", N="i32", H="i32", v0="i32", VC="i32",
                stride_hn="i64", stride_wv="i64", stride_gn="i64", stride_gb="i64",
                inv_temp="fp32")


def _dot_precisions(dt: str) -> tuple[str, ...]:
    # linear_logprobs._dot_precision: fp32 follows torch's allow_tf32 (either), else tf32.
    return ("ieee", "tf32") if dt == "fp32" else ("tf32",)


def _pointers(signature: Callable[[str], dict[str, str]]) -> tuple[str, ...]:
    return tuple(name for name, kind in signature("bf16").items() if kind.startswith("*"))


KERNELS = (
    KernelSpec("geovlm.kernels.logprobs", "_logsoftmax_fwd_kernel", _logits_fwd_signature,
               lambda dt: dict(HAS_MASK=(False, True), WITH_ENTROPY=(False, True)),
               aligned=_pointers(_logits_fwd_signature) + ("vocab", "stride_lb", "stride_lt"),
               unit=("stride_il", "stride_ml")),
    KernelSpec("geovlm.kernels.logprobs", "_grad_logits_kernel", _logits_bwd_signature,
               lambda dt: {},
               aligned=_pointers(_logits_bwd_signature) + ("vocab", "stride_lb", "stride_lt",
                                                           "stride_gb", "stride_gt"),
               unit=("stride_il",)),
    KernelSpec("geovlm.kernels.linear_logprobs", "_forward_chunk_kernel", _linear_fwd_signature,
               lambda dt: dict(HAS_BIAS=(False, True), WITH_ENTROPY=(False, True),
                               DOT_PRECISION=_dot_precisions(dt), EVEN_K=(False, True)),
               aligned=_pointers(_linear_fwd_signature) + ("H", "VC", "stride_hn", "stride_wv"),
               unit=("stride_hk", "stride_wk")),
    KernelSpec("geovlm.kernels.linear_logprobs", "_grad_logits_chunk_kernel",
               _linear_bwd_signature,
               lambda dt: dict(HAS_BIAS=(False, True), BIAS_GRAD=(False, True),
                               ENTROPY_GRAD=(False, True), DOT_PRECISION=_dot_precisions(dt),
                               EVEN_K=(False, True)),
               aligned=_pointers(_linear_bwd_signature) + ("H", "VC", "stride_hn", "stride_wv",
                                                           "stride_gn", "stride_gb"),
               unit=("stride_hk", "stride_wk"),
               # The bias gradient is only asked for when there is a bias.
               launchable=lambda c: c["HAS_BIAS"] or not c["BIAS_GRAD"]),
)

# The default suite's few compilations: each kernel at its biggest tile on the tightest card for
# the dtype (bf16 on sm_90; fp32 -- twice the bytes per element -- on sm_80), every branch on;
# and the two cases whose PTX must move logits in 16-byte vectors.
SUBSET = (
    ("_logsoftmax_fwd_kernel", 90, "bf16", dict(BLOCK_V=4096), 8,
     dict(HAS_MASK=True, WITH_ENTROPY=True)),
    ("_logsoftmax_fwd_kernel", 90, "bf16", dict(BLOCK_V=4096), 8,
     dict(HAS_MASK=False, WITH_ENTROPY=False)),
    ("_grad_logits_kernel", 90, "bf16", dict(BLOCK_V=8192), 16, {}),
    ("_forward_chunk_kernel", 90, "bf16", dict(BLOCK_M=128, BLOCK_N=256), 8,
     dict(HAS_BIAS=True, WITH_ENTROPY=True, DOT_PRECISION="tf32", EVEN_K=False)),
    ("_grad_logits_chunk_kernel", 90, "bf16", dict(BLOCK_M=128, BLOCK_N=256), 8,
     dict(HAS_BIAS=True, BIAS_GRAD=True, ENTROPY_GRAD=True, DOT_PRECISION="tf32", EVEN_K=False)),
    ("_grad_logits_chunk_kernel", 80, "fp32", dict(BLOCK_M=64, BLOCK_N=256), 4,
     dict(HAS_BIAS=True, BIAS_GRAD=True, ENTROPY_GRAD=True, DOT_PRECISION="ieee", EVEN_K=True)),
)


def _kernel(spec: KernelSpec):
    import importlib

    return getattr(importlib.import_module(spec.module), spec.name)


def _jit_function(kernel):
    """The ``JITFunction`` under an autotuner / heuristics wrapper."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def launch_configs(kernel, dt: str) -> list:
    """The autotune configs the autotuner can run for inputs of dtype ``dt``."""
    import torch

    configs = list(getattr(kernel, "configs", []))
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:
        probe = torch.empty(0, dtype=getattr(torch, DTYPES[dt]))
        named = {name: probe for name in _jit_function(kernel).arg_names}
        configs = prune(configs, named)
    return configs


def _config_key(config) -> dict:
    return dict(config.all_kwargs())


def jobs(matrix: str) -> list[dict]:
    """Every compilation of ``matrix`` ("full" or "subset") as a plain dict."""
    specs = {spec.name: spec for spec in KERNELS}
    out = []
    if matrix == "subset":
        for name, arch, dt, tile, warps, constexprs in SUBSET:
            kernel = _kernel(specs[name])
            config = next(c for c in launch_configs(kernel, dt)
                          if tile.items() <= c.kwargs.items() and c.num_warps == warps)
            out.append(dict(kernel=name, arch=arch, dtype=dt, config=_config_key(config),
                            constexprs=constexprs))
        return out
    for spec in KERNELS:
        kernel = _kernel(spec)
        for dt in DTYPES:
            branches = spec.branches(dt)
            for values in itertools.product(*branches.values()):
                constexprs = dict(zip(branches, values, strict=True))
                if not spec.launchable(constexprs):
                    continue
                for config in launch_configs(kernel, dt):
                    for arch in TARGETS:
                        out.append(dict(kernel=spec.name, arch=arch, dtype=dt,
                                        config=_config_key(config), constexprs=constexprs))
    return out


def compile_one(job: dict) -> dict:
    """Compile one job; the record adds ``shared`` (bytes), ``vectors`` or ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = next(s for s in KERNELS if s.name == job["kernel"])
    jit = _jit_function(_kernel(spec))
    # A config holds the kernel's tile constexprs and compile options (num_warps, num_stages...).
    options = {k: v for k, v in job["config"].items() if k not in jit.arg_names}
    constexprs = {**{k: v for k, v in job["config"].items() if k in jit.arg_names},
                  **job["constexprs"], **dict.fromkeys(spec.unit, 1)}
    runtime = spec.signature(job["dtype"])
    signature = {name: runtime.get(name, "constexpr") for name in jit.arg_names}
    missing = sorted(n for n, t in signature.items() if t == "constexpr" and n not in constexprs)
    unknown = sorted(set(runtime) - set(jit.arg_names))
    if missing or unknown:
        return {**job, "error": f"launch spec out of date: constexprs {missing} unset, "
                                f"arguments {unknown} not in the kernel"}
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    try:
        compiled = triton.compile(
            ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", job["arch"], 32), options=options,
        )
    except Exception as err:  # noqa: BLE001 - every compile failure is a finding to report
        return {**job, "error": f"{type(err).__name__}: {str(err)[-2000:]}"}
    vectors = sorted(set(_VECTOR_OPS.findall(compiled.asm["ptx"])))
    return {**job, "shared": compiled.metadata.shared, "vectors": vectors}


def autotuned_kernels() -> list[str]:
    """Names of every autotuned or ``*_kernel`` Triton function in the package's modules."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import geovlm.kernels

    names = []
    for info in pkgutil.iter_modules(geovlm.kernels.__path__):
        if info.name == "trl":
            continue  # the TRL adapter imports trl and holds no kernel
        module = importlib.import_module(f"geovlm.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Autotuner) or (
                isinstance(value, JITFunction) and name.endswith("_kernel")
            ):
                names.append(name)
    return sorted(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("matrix", choices=("subset", "full"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    from geovlm.kernels._dispatch import interpreting

    if interpreting():
        raise SystemExit("run with TRITON_INTERPRET unset: the interpreter compiles nothing")
    todo = jobs(args.matrix)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            records = list(pool.map(compile_one, todo, chunksize=1))
    else:
        records = [compile_one(job) for job in todo]
    print(json.dumps({"kernels": autotuned_kernels(), "covered": sorted(s.name for s in KERNELS),
                      "records": records}))


if __name__ == "__main__":
    main()
