"""Fused GRPO-loss kernels (Triton) and their pure-torch reference.

Importing this package imports neither transformers, trl nor numba.
"""
