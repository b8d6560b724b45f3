"""GeoVLM-R1 trainer: SFT then per-task GRPO for Qwen2.5-VL on Earth-observation imagery.

Subpackages are imported lazily by their users: ``geovlm.kernels`` stands alone (torch + triton),
``geovlm.rewards`` needs only numpy/numba, the trainer modules need transformers.
"""

__version__ = "0.1.0"
