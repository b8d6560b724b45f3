"""Shared prompt prefix: each GRPO prompt runs through the model once per group, not G times.

A group's G rows share one prompt (for an EO task: an image of hundreds of vision tokens plus the
instruction), and in a causal model nothing the prompt positions compute depends on what follows
them. So the vision tower, and every layer's keys and values over the prompt, are the same in all
G rows. TRL (and the full path here) still recompute them G times, in the rollout's prefill, the
policy forward with grad, and the reference / old-policy passes. This module runs the prompts
once (``P`` rows), repeats the KV cache ``G`` times, and runs only the completions (``R = P*G``
rows of ``Lc`` tokens) against it. With autograd through the cache, the policy's gradients reach
the prompt positions exactly as in the full forward (the repeat sums the G rows' contributions).

Activation checkpointing: a checkpointed layer normally drops the KV cache, because its replay
in the backward pass would write the cache a second time. The teacher-forced passes here use
caches that a replay cannot disturb (the prompt pass *replaces* its layer's keys and values;
the completion pass reads a fixed, already repeated prefix and stores nothing), and tell the
layers that checkpoint so for the duration of the call, through the one switch transformers
has for it (``GradientCheckpointingLayer._can_checkpoint_with_cache``, meant for layers that
only read the cache; a transformers without it is refused, not silently given no cache). Without
activation checkpointing nothing is switched. The caches are plain public ``Cache`` objects
built from the two layer kinds below.

Padding: a completion batch is as wide as its longest row, and on the CPU those padded positions
cost as much as real ones (the passes are compute-bound). On a single CPU process the
teacher-forced pass groups the rows by length (``length_chunks``: a few groups, each run only as
far as its longest row), which ran the default's detection step's two passes 1.4x faster.

The positions are computed explicitly (``rope_positions``), not left to the model's stateful
``rope_deltas``: the prompt keeps the 3-D mRoPE positions a full forward would give it, and
completion token ``j`` gets the text position ``last prompt position + 1 + j`` on all three axes,
which is what ``get_rope_index`` assigns to text after the prompt.

Shapes: ``prompt`` is a left-padded prompt batch of ``P`` rows (``input_ids`` ``[P, Lp]``,
``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``);
``completion_ids`` / ``completion_mask`` are ``[R, Lc]`` with rows ``i*G .. i*G+G-1`` the group
of prompt ``i``. ``completion_outputs`` returns ``[R, Lc, H]``: the final-norm hidden states
that predict each completion token (``@ lm_head.weight.T`` gives its logits), or those logits
``[R, Lc, V]``. ``encode_prompts`` / ``continue_from`` are the two passes the rollout's decode
loop uses too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from geovlm.model import forward_hidden, forward_logits, unwrap
from geovlm.packed import mrope_positions
from geovlm.runtime import is_distributed


def cache_argument(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier 5.x)."""
    return _cache_argument_of(type(unwrap(model)))


@functools.cache
def _cache_argument_of(model_class: type) -> str:
    # Once per class: inspect.signature costs as much as a decode step's attention mask.
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def rope_positions(model: torch.nn.Module, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[3, P, Lp]`` mRoPE positions of a left-padded prompt batch, as a full forward gives them.

    With images: the model's ``get_rope_index`` (``geovlm.packed.mrope_positions``; padding
    gets 0, it is masked). Text only: the model then numbers positions ``0 .. Lp-1`` including
    the padding, and so does this.
    """
    ids = prompt["input_ids"]
    if prompt.get("image_grid_thw") is None and prompt.get("video_grid_thw") is None:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return positions.view(1, 1, -1).expand(3, ids.shape[0], -1)
    return mrope_positions(model, prompt)


def completion_positions(prompt_positions: torch.Tensor, length: int) -> torch.Tensor:
    """``[P, length]`` text positions of the tokens after each prompt (same on all 3 axes)."""
    last = prompt_positions[0, :, -1]  # left padding: every row's last token is real
    return last[:, None] + 1 + torch.arange(length, device=last.device)


def _as_3d(positions: torch.Tensor) -> torch.Tensor:
    return positions[None].expand(3, -1, -1)


Output = Literal["hidden", "logits", "last_logits"]


def _run(model: torch.nn.Module, output: Output, inputs: dict, cache: Cache) -> torch.Tensor:
    """One forward pass with ``cache``; ``output`` picks what comes back.

    ``"hidden"``: final-norm hidden states ``[B, T, H]`` (the input of ``lm_head``);
    ``"logits"``: ``[B, T, V]``; ``"last_logits"``: ``[B, 1, V]`` of the last position only.
    ``geovlm.model``'s forwards, so wrappers and FSDP2 see the pass as any other.
    """
    extra = {"use_cache": True, cache_argument(model): cache}
    if output == "hidden":
        return forward_hidden(model, inputs, **extra)
    return forward_logits(model, inputs, 1 if output == "last_logits" else 0, **extra)


class PromptLayer(DynamicLayer):
    """The prompt pass's keys and values ``[P, heads, Lp, d]``: each update replaces them, so
    the replay of a checkpointed layer leaves the same state."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class PrefixedLayer(DynamicLayer):
    """A fixed prefix ``[R, heads, Lp, d]``: each update returns prefix + the new states and
    stores nothing, so a replay reads the same prefix."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return (
            torch.cat([self.keys, key_states], dim=-2),
            torch.cat([self.values, value_states], dim=-2),
        )


class GrowingLayer(DynamicLayer):
    """A decoding cache layer ``[B, heads, L, d]`` that writes each step's keys and values into
    the spare room of a buffer instead of concatenating them (a full buffer is replaced by one
    twice the length it must hold: the prompt pass leaves room for as many new tokens).

    ``DynamicLayer.update`` concatenates, copying the whole cache every decode step (quadratic
    in the completion's length): on the tiny model that copy was ~45 % of a decode step. Here a
    step writes its own tokens only; ``keys`` / ``values`` are views of the filled part, the
    values ``DynamicLayer`` would hold. No autograd: decoding runs without grad.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            raise RuntimeError("GrowingLayer writes in place: decode without grad")
        end = self.length + key_states.shape[-2]
        capacity = 0 if self.key_buffer is None else self.key_buffer.shape[-2]
        if end > capacity:
            self._resize(key_states, 2 * end)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self._set_length(end)
        return self.keys, self.values

    def _resize(self, like: torch.Tensor, capacity: int) -> None:
        """New buffers ``[B, heads, capacity, d]`` (shaped as ``like``) holding the filled part."""
        shape = (*like.shape[:2], capacity, like.shape[-1])
        keys, values = like.new_empty(shape), like.new_empty(shape)
        if self.length:
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        self.key_buffer, self.value_buffer = keys, values

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]

    def get_seq_length(self, *args, **kwargs) -> int:  # older transformers pass a position
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative token count, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized and self.key_buffer is not None:
            self._set_length(max(self.length + tokens_to_remove, 0))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._set_length(self.length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self._set_length(self.length)


def decoding_cache(model: torch.nn.Module) -> Cache:
    """The cache a decode loop grows: ``DynamicCache``'s layers for the model's config, its
    full-attention layers as ``GrowingLayer`` (sliding-window layers are left as they are)."""
    cache = DynamicCache(config=unwrap(model).config.get_text_config())
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


@contextmanager
def cache_through_checkpoints(model: torch.nn.Module) -> Iterator[None]:
    """Checkpointed layers keep the cache argument (safe with the two layer kinds above)."""
    layers = [
        m
        for m in unwrap(model).modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]
    if layers and not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"):
        # An older transformers would silently drop the cache: completions without their prompt.
        raise RuntimeError(
            "this transformers version drops the KV cache in checkpointed layers; turn "
            "activation checkpointing off or set the stage's prompt_sharing=false"
        )
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


@dataclass
class EncodedPrompts:
    """The prompts run once: what every completion row of their groups continues from.

    Attributes:
        last: ``[P, H]`` hidden state (or ``[P, V]`` logits) at each prompt's last token: what
            predicts completion token 0.
        cache: the KV cache of the prompt positions (``P`` rows until ``repeat`` is called).
        attention_mask: ``[P, Lp]`` the prompts' padding mask.
        positions: ``[3, P, Lp]`` their mRoPE positions.
    """

    last: torch.Tensor
    cache: Cache
    attention_mask: torch.Tensor
    positions: torch.Tensor


def encode_prompts(
    model: torch.nn.Module,
    prompt: dict[str, torch.Tensor],
    cache: Cache | None = None,
    output: Output = "hidden",
) -> EncodedPrompts:
    """One forward over the ``P`` prompts (images included), keeping their KV cache.

    ``cache`` defaults to a growing ``DynamicCache`` (for decoding); ``output`` is ``"hidden"``
    or ``"last_logits"`` (what ``EncodedPrompts.last`` holds). Runs with or without grad as the
    caller's mode says; under grad the cache carries it.
    """
    positions = rope_positions(model, prompt)
    if cache is None:
        cache = decoding_cache(model)
    out = _run(model, output, {**prompt, "position_ids": positions}, cache)
    return EncodedPrompts(out[:, -1], cache, prompt["attention_mask"], positions)


def continue_from(
    model: torch.nn.Module,
    encoded: EncodedPrompts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    output: Output = "hidden",
) -> torch.Tensor:
    """``output`` (see ``_run``) of ``input_ids`` ``[R, T]`` after the cached prompts.

    ``attention_mask`` ``[R, cached + T]`` covers the cache and the new tokens; ``positions``
    ``[R, T]`` are the new tokens' text positions. A decoding cache grows by the new tokens.
    """
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": _as_3d(positions),
    }
    return _run(model, output, inputs, encoded.cache)


# What one more teacher-forced pass costs beyond its token positions (per-operation overhead,
# in token positions). Measured on the tiny model: benchmarks/bench_length_chunks.py.
PASS_COST_TOKENS = 256


def length_chunks(
    lengths: torch.Tensor, pass_cost: int | None = None, max_chunks: int = 4
) -> list[torch.Tensor]:
    """Rows grouped so that each group runs only as many positions as its longest row needs.

    ``lengths`` ``[R]``: each row's needed positions (its completion tokens up to its last
    unmasked one). Returns row-index tensors, each in increasing order, together a permutation
    of ``0 .. R-1``. A padded pass over ``R`` rows of the longest length
    computes every row's padding; splitting the rows sorted by length into groups computes
    ``sum(rows x longest)`` per group instead, at the price of one more pass (``pass_cost``
    token positions of per-operation overhead). The grouping minimising that total, with at
    most ``max_chunks`` groups, is found exactly by dynamic programming over the sorted rows.
    ``pass_cost`` defaults to ``PASS_COST_TOKENS``.
    """
    if pass_cost is None:
        pass_cost = PASS_COST_TOKENS
    ordered, order = torch.sort(lengths.cpu().double(), descending=True, stable=True)
    ordered = ordered.numpy()
    rows = len(ordered)
    # cost[i, j]: sorted rows i .. j-1 as one group (row i is its longest), one pass included.
    i, j = np.arange(rows + 1)[:, None], np.arange(rows + 1)[None, :]
    longest = np.append(ordered, 0.0)[:, None]
    cost = np.where(i < j, (j - i) * longest + pass_cost, np.inf)
    # best[j]: the cheapest grouping of the first j rows in k groups; starts[k][j]: where its
    # last group starts.
    best = np.full(rows + 1, np.inf)
    best[0] = 0.0
    totals, starts = [], []
    for _ in range(max_chunks):
        candidates = best[:, None] + cost
        starts.append(candidates.argmin(axis=0))
        best = candidates.min(axis=0)
        totals.append(best[rows])
    k = int(np.argmin(totals))  # the fewest groups among equal costs
    groups, end = [], rows
    while end:
        begin = int(starts[k][end])
        groups.append(order[begin:end].sort().values.to(lengths.device))
        end, k = begin, k - 1
    return groups[::-1]


def completion_outputs(
    model: torch.nn.Module,
    prompt: dict[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    num_generations: int,
    output: Literal["hidden", "logits"] = "hidden",
) -> torch.Tensor:
    """What predicts each completion token, prompts run once: ``[R, Lc, H]`` hidden states or
    ``[R, Lc, V]`` logits.

    Equal (up to float rounding) to ``forward_hidden(model, prompt + completion)[:, Lp-1:-1]``
    (or the logits there) on the prompts repeated ``num_generations`` times, with or without
    activation checkpointing. Logits are computed inside the model's forward, so they also work
    where ``lm_head`` is sharded (FSDP2 / ZeRO-3). On a single CPU process the rows run in
    groups of similar length (``length_chunks``), each only as far as its longest row's last
    unmasked token; positions past that are zeros (no loss reads them).
    """
    rows, length = completion_ids.shape
    n_prompts = prompt["input_ids"].shape[0]
    if rows != n_prompts * num_generations:
        raise ValueError(
            f"{rows} completion rows for {n_prompts} prompts x {num_generations} generations"
        )
    first_output = "hidden" if output == "hidden" else "last_logits"
    with cache_through_checkpoints(model):
        encoded = encode_prompts(
            model, prompt, Cache(layer_class_to_replicate=PromptLayer), output=first_output
        )
        first = encoded.last.repeat_interleave(num_generations, dim=0)[:, None]
        if length == 1:
            return first
        prompt_keys = [(layer.keys, layer.values) for layer in encoded.cache.layers]
        positions = completion_positions(encoded.positions, length)
        needed_all = needed_positions(completion_mask)
        groups = _row_groups(needed_all)
        parts = []
        for group in groups:
            needed = int(needed_all[group].max())
            of_prompt = group // num_generations
            parts.append(
                _continue_rows(
                    model, encoded, prompt_keys, of_prompt, first.index_select(0, group),
                    completion_ids[group, : needed - 1],
                    completion_mask[group, : needed - 1],
                    positions[of_prompt, : needed - 1], output, length,
                )
            )
    if len(parts) == 1:  # one group holds every row, in order
        return parts[0]
    return torch.cat(parts).index_select(0, torch.argsort(torch.cat(groups)))


def _row_groups(needed: torch.Tensor) -> list[torch.Tensor]:
    """``length_chunks`` of the rows (``needed``: ``needed_positions``) on a single CPU
    process, else all rows in one pass.

    Sharded engines (FSDP2, ZeRO-3) gather parameters in every forward, so every rank must run
    the same number of passes, and DDP expects one forward per backward: grouping stays off
    under ``torch.distributed``. On CUDA the cost per pass was not measured, so neither is it
    used there.
    """
    if needed.device.type != "cpu" or (is_distributed() and torch.distributed.get_world_size() > 1):
        return [torch.arange(needed.shape[0], device=needed.device)]
    return length_chunks(needed)


def needed_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """``[R]`` how many leading positions of each row the loss reads: up to its last unmasked
    token (at least one)."""
    positions = torch.arange(1, completion_mask.shape[1] + 1, device=completion_mask.device)
    return (positions * (completion_mask != 0)).amax(dim=1).clamp(min=1)


def _continue_rows(
    model: torch.nn.Module,
    encoded: EncodedPrompts,
    prompt_keys: list[tuple[torch.Tensor, torch.Tensor]],
    of_prompt: torch.Tensor,
    first: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    positions: torch.Tensor,
    output: Output,
    width: int,
) -> torch.Tensor:
    """``[r, width, D]`` outputs of ``r`` rows (prompt ``of_prompt[k]`` for row ``k``) whose
    loss reads only their first ``T + 1`` positions: ``first`` ``[r, 1, D]`` (from the prompt's
    last token), then the outputs of ``completion_ids`` ``[r, T]`` (tokens ``0 .. T-1``), then
    zeros up to ``width`` (positions no loss reads)."""
    outputs = [first]
    if completion_ids.shape[1]:
        rows_encoded = EncodedPrompts(
            first,
            # index_select, not k[of_prompt]: the G rows of a prompt repeat its index, and the
            # backward of advanced indexing (index_put_ with accumulate) sums them in an order
            # that depends on the thread count; index_select's (index_add_) does not.
            Cache(
                layers=[
                    PrefixedLayer(k.index_select(0, of_prompt), v.index_select(0, of_prompt))
                    for k, v in prompt_keys
                ]
            ),
            encoded.attention_mask[of_prompt],
            encoded.positions,
        )
        mask = torch.cat(
            [rows_encoded.attention_mask, completion_mask.to(encoded.attention_mask.dtype)], dim=1
        )
        outputs.append(continue_from(model, rows_encoded, completion_ids, mask, positions, output))
    done = sum(o.shape[1] for o in outputs)
    if done < width:
        outputs.append(first.new_zeros(first.shape[0], width - done, first.shape[2]))
    return torch.cat(outputs, dim=1)
