"""GeoVLM-R1 trainer: SFT then per-task GRPO for Qwen2.5-VL on Earth-observation imagery.

Subpackages are imported lazily by their users: ``geovlm.kernels`` stands alone (torch + triton),
``geovlm.rewards`` needs only numpy/numba, the trainer modules need transformers.
"""

import os

# Bitwise the same results whatever the thread count: a run picks its threads from the CPUs it
# may use (geovlm.runtime), so a resume or a rerun on a busier machine may get another count,
# and MKL's GEMM otherwise splits some reductions by thread (the GRPO step's weight gradients
# differed between 1 and 2 threads). Strict conditional numerical reproducibility fixes the
# order; it must be set before MKL starts, hence here, before torch is imported. The GRPO step
# costs ~3 % more; SFT the same. A user's own MKL_CBWR is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
