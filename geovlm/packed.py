"""Packed SFT batches on the model: which models can run them, their mRoPE positions, packing.

``geovlm.data.packing`` packs a right-padded batch into rows given the samples' own mRoPE
positions; this module asks the model for those positions (``mrope_positions``) and decides
whether and how to pack for it (``packing_unsupported``, ``pack_for_model``).

How transformers reads this (checked in the sources of 5.17 and 5.24): the Qwen2(.5)-VL text
model splits 4-row ``position_ids`` into text positions (row 0) and mRoPE positions (rows 1-3).
With ``attention_mask=None`` and no cache, ``masking_utils.create_causal_mask`` finds the
sequences of each row from row 0 (``find_packed_sequence_indices``: a new sequence wherever the
position does not grow by exactly 1) and builds a block-diagonal causal mask for SDPA and eager.
Flash-attention 2 instead runs its varlen kernel on the restarts (positions equal to the minimum,
0), but only when the batch is a single row (``_is_packed_sequence`` requires batch size 1): with
several rows it would attend across samples. ``pack_for_model`` therefore puts everything in
one row for flash-attention: that row is padding-free, however long, and varlen attention costs
what its samples cost alone.
"""

from __future__ import annotations

import inspect

import torch
from transformers import masking_utils

from geovlm.data.packing import pack_batch, plan_rows, sequence_lengths
from geovlm.model import unwrap

PACKABLE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
PACKABLE_ATTENTION = ("eager", "sdpa", "flash_attention_2")


def attention_implementation(model) -> str:
    """The text model's attention backend (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``)."""
    config = unwrap(model).config
    return str(config.get_text_config()._attn_implementation)


def packing_unsupported(model) -> str | None:
    """Why ``model`` cannot train on packed sequences, or None when it can."""
    inner = unwrap(model)
    model_type = getattr(inner.config, "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {PACKABLE_MODEL_TYPES}"
    attn = attention_implementation(inner)
    if attn not in PACKABLE_ATTENTION:
        return f"attention implementation {attn!r} is not one of {PACKABLE_ATTENTION}"
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return "the installed transformers builds no packed-sequence masks"
    if not callable(getattr(getattr(inner, "model", inner), "get_rope_index", None)):
        return f"{type(inner).__name__} has no get_rope_index"
    return None


def _rope_index_inputs(inner, batch: dict[str, torch.Tensor], params) -> dict:
    inputs = {
        key: batch[key]
        for key in ("mm_token_type_ids", "image_grid_thw", "attention_mask")
        if key in batch and key in params
    }
    if "mm_token_type_ids" in params and "mm_token_type_ids" not in batch:
        # Processors that do not emit it: text 0, image 1, video 2, as transformers defines it.
        ids = batch["input_ids"]
        kinds = torch.zeros_like(ids)
        kinds[ids == inner.config.image_token_id] = 1
        kinds[ids == inner.config.video_token_id] = 2
        inputs["mm_token_type_ids"] = kinds
    return inputs


@torch.no_grad()
def mrope_positions(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[3, B, T]`` mRoPE positions of a right-padded batch, as its unpacked forward computes.

    Calls the model's own ``get_rope_index`` with the arguments its signature takes.
    """
    inner = unwrap(model)
    rope_index = getattr(inner, "model", inner).get_rope_index
    params = inspect.signature(rope_index).parameters
    positions, _ = rope_index(batch["input_ids"], **_rope_index_inputs(inner, batch, params))
    return positions


def pack_for_model(
    model, batch: dict[str, torch.Tensor], capacity: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """``batch`` packed for ``model`` into rows of at most ``capacity`` tokens.

    With flash-attention 2 every sample goes into one row, whatever ``capacity`` (see the module
    docstring). Raises ValueError naming the reason when the model cannot run packed sequences.
    """
    reason = packing_unsupported(model)
    if reason is not None:
        raise ValueError(f"cannot pack sequences: {reason}")
    lengths = sequence_lengths(batch)
    if attention_implementation(model) == "flash_attention_2":
        capacity = max(capacity, sum(lengths))
    plan = plan_rows(lengths, capacity)
    image_token_id = int(unwrap(model).config.image_token_id)
    return pack_batch(batch, mrope_positions(model, batch), plan, pad_id, image_token_id)
