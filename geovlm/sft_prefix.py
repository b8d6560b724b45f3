"""SFT with the batch's shared leading tokens run once (``stage.prompt_sharing``).

Every SFT sample opens with the same tokens: the chat template's system turn and the start of
the user turn (``<|im_start|>system ... <|im_end|> <|im_start|>user <|vision_start|>``). On the
embedded default that is 51 of a sample's ~110 tokens; on a real run it is the system prompt of
every sample. In a causal model nothing these positions compute depends on what follows them,
so their keys and values are the same in every row. This module runs them once (one row of
``Lp`` tokens, with grad), lets every row attend to that shared KV cache, and packs only what
follows (the *rests*: images, instruction, response) into rows, as ``geovlm.data.packing``
packs whole samples. Autograd through the cache sums each row's contribution to the prefix,
so the loss and its gradients are those of the padded batch (``tests/test_sft_prefix.py``).

Shapes. ``split_shared_prefix`` takes the right-padded batch of ``collate_sft`` (``[B, T]``) and
returns a ``SharedPrefixBatch``:

* ``prefix_ids`` ``[1, Lp]``: the common leading tokens, text positions ``0 .. Lp-1``;
* ``rest``: the rests packed into ``[R, W]`` rows (``input_ids``, ``labels``, ``mm_token_type_ids``
  when the processor emits it), their images (``pixel_values``, ``image_grid_thw``) in packed
  order, ``position_ids`` ``[3, R, W]``: each token's mRoPE position in its own unpacked sample;
* ``segments`` ``[R, W]``: which sample of its row each position belongs to (padding continues
  the row's last sample, as in ``pack_batch``).

``rest["labels"][:, 1:]`` are the targets, exactly the labels of the padded batch (the prefix and
the first token of each rest carry none: ``common_prefix_length`` stops before them).

The attention mask is a 4-D additive mask ``[R, 1, W, Lp + W]`` (prefix: visible to every token;
rests: causal within their own sample), which transformers passes to SDPA and eager attention
as it is. Flash-attention 2 takes no such mask (it packs whole samples into one padding-free row
instead), so ``prefix_sharing_unsupported`` refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Cache

from geovlm.data.collate import IGNORE_INDEX
from geovlm.data.packing import pack_batch, plan_rows, sequence_lengths
from geovlm.model import forward_hidden, forward_logits, unwrap
from geovlm.packed import attention_implementation, mrope_positions, packing_unsupported
from geovlm.prefix import (
    PrefixedLayer,
    PromptLayer,
    cache_argument,
    cache_through_checkpoints,
)

# Attention backends that take a custom 4-D mask as it is.
PREFIX_SHARING_ATTENTION = ("sdpa", "eager")


def prefix_sharing_unsupported(model) -> str | None:
    """Why ``model`` cannot run SFT batches with a shared prefix, or None when it can."""
    reason = packing_unsupported(model)  # the same mRoPE positions and packed rests
    if reason is not None:
        return reason
    attn = attention_implementation(model)
    if attn not in PREFIX_SHARING_ATTENTION:
        return f"attention implementation {attn!r} takes no custom 4-D mask"
    return None


def common_prefix_length(
    batch: dict[str, torch.Tensor], positions: torch.Tensor, vision_token_ids: Sequence[int]
) -> int:
    """``Lp``: how many leading tokens every row of a right-padded batch shares.

    The prefix holds only text tokens (none of ``vision_token_ids``, the image / video
    placeholders) at text positions (``positions[:, b, t] == t`` on all three mRoPE axes),
    carries no label, and ends at least one token before each row's first label (that token's
    hidden state is computed in the rest, so each rest starts with an unlabelled token); it
    never takes a whole row. ``positions``: the batch's ``[3, B, T]`` mRoPE positions
    (``geovlm.packed.mrope_positions``).
    """
    ids = batch["input_ids"]
    lengths = torch.tensor(sequence_lengths(batch), device=ids.device)
    width = ids.shape[1]
    steps = torch.arange(width, device=ids.device)
    same = (ids == ids[:1]).all(dim=0)
    vision = torch.isin(ids[0], torch.tensor(list(vision_token_ids), device=ids.device))
    text = (positions == steps).all(dim=0).all(dim=0) & ~vision
    real = steps[None, :] < lengths[:, None]
    unlabelled = (batch["labels"] == IGNORE_INDEX).all(dim=0)
    # Position t may be in the prefix only if t + 1 is unlabelled too and every row goes on.
    next_unlabelled = torch.cat([unlabelled[1:], unlabelled.new_zeros(1)])
    ok = same & text & real.all(dim=0) & unlabelled & next_unlabelled
    ok &= steps + 1 < lengths.min()
    bad = (~ok).nonzero()
    return int(bad[0]) if bad.numel() else width


@dataclass
class SharedPrefixBatch:
    """An SFT micro-batch as one shared prefix and the packed rests (module docstring)."""

    prefix_ids: torch.Tensor  # [1, Lp]
    rest: dict[str, torch.Tensor]  # [R, W] sequence keys, position_ids [3, R, W], images
    segments: torch.Tensor  # [R, W]

    @property
    def labels(self) -> torch.Tensor:
        return self.rest["labels"]

    @property
    def prefix_length(self) -> int:
        return self.prefix_ids.shape[1]

    def tokens(self) -> int:
        """Positions the model runs: the prefix once, plus the packed rows."""
        return self.prefix_length + self.rest["input_ids"].numel()

    def to(self, device: torch.device) -> SharedPrefixBatch:
        return SharedPrefixBatch(
            self.prefix_ids.to(device),
            {k: v.to(device) for k, v in self.rest.items()},
            self.segments.to(device),
        )


def split_shared_prefix(
    model, batch: dict[str, torch.Tensor], pad_id: int, min_prefix: int = 1
) -> SharedPrefixBatch | None:
    """``batch`` (right-padded, ``[B, T]``) as a shared prefix and packed rests, or None when
    its rows share fewer than ``min_prefix`` leading tokens.

    The rests are packed first-fit-decreasing into rows no wider than the longest rest.
    """
    reason = prefix_sharing_unsupported(model)
    if reason is not None:
        raise ValueError(f"cannot share the SFT prefix: {reason}")
    positions = mrope_positions(model, batch)
    config = unwrap(model).config
    vision_ids = [
        int(i)
        for i in (config.image_token_id, getattr(config, "video_token_id", None))
        if i is not None
    ]
    prefix = common_prefix_length(batch, positions, vision_ids)
    if prefix < max(min_prefix, 1):
        return None
    rests = {
        key: value[:, prefix:] if key not in ("pixel_values", "image_grid_thw") else value
        for key, value in batch.items()
    }
    lengths = sequence_lengths(rests)
    plan = plan_rows(lengths, max(lengths))
    packed = pack_batch(rests, positions[:, :, prefix:], plan, pad_id, vision_ids[0])
    text = packed.pop("position_ids")
    packed["position_ids"] = text[1:]
    # Row 0 restarts at 0 at each sample's first token (padding continues the last sample).
    segments = (text[0] == 0).long().cumsum(dim=1) - 1
    return SharedPrefixBatch(batch["input_ids"][:1, :prefix], packed, segments)


def shared_prefix_mask(batch: SharedPrefixBatch, dtype: torch.dtype) -> torch.Tensor:
    """``[R, 1, W, Lp + W]`` additive mask: 0 where a rest token may attend, the dtype's
    minimum elsewhere (the prefix: every token; the rest: its own sample, causally)."""
    segments = batch.segments
    rows, width = segments.shape
    steps = torch.arange(width, device=segments.device)
    causal = steps[None, :] <= steps[:, None]  # [W (query), W (key)]
    same = segments[:, :, None] == segments[:, None, :]  # [R, W, W]
    visible = torch.cat(
        [
            torch.ones(rows, width, batch.prefix_length, dtype=torch.bool, device=segments.device),
            same & causal,
        ],
        dim=2,
    )
    mask = torch.zeros(visible.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def _dtype(model) -> torch.dtype:
    return next(unwrap(model).parameters()).dtype


def shared_prefix_forward(
    model,
    batch: SharedPrefixBatch,
    output: str = "hidden",
    logits_to_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The packed rests' final hidden states ``[R, W, H]`` (``output="hidden"``) or logits
    ``[R, K, V]`` at the rest positions ``logits_to_keep`` (``output="logits"``), after one pass
    over the shared prefix.

    Equal, position for position, to what the padded batch's full forward computes for the
    same tokens. Runs with or without grad as the caller's mode says.
    """
    rows = batch.rest["input_ids"].shape[0]
    prefix_positions = torch.arange(batch.prefix_length, device=batch.prefix_ids.device)
    with cache_through_checkpoints(model):
        cache = Cache(layer_class_to_replicate=PromptLayer)
        # Inside a DDP / DeepSpeed wrapper the prefix runs on the wrapped module: the wrapper
        # sees one forward per micro-batch (the rests'), whose graph reaches the prefix through
        # the cache, so its gradient hooks fire once per parameter as usual. Sharded engines
        # (FSDP2, ZeRO-3) do not come here (geovlm.sft.model_batch).
        forward_hidden(
            unwrap(model),
            {
                "input_ids": batch.prefix_ids,
                "attention_mask": torch.ones_like(batch.prefix_ids),
                "position_ids": prefix_positions.view(1, 1, -1).expand(3, 1, -1),
            },
            use_cache=True,
            **{cache_argument(model): cache},
        )
        shared = Cache(
            layers=[
                PrefixedLayer(
                    layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
                )
                for layer in cache.layers
            ]
        )
        inputs = {
            **{k: v for k, v in batch.rest.items() if k != "labels"},
            "attention_mask": shared_prefix_mask(batch, _dtype(model)),
        }
        extra = {"use_cache": True, cache_argument(model): shared}
        if output == "hidden":
            return forward_hidden(model, inputs, **extra)
        keep = 0 if logits_to_keep is None else logits_to_keep
        return forward_logits(model, inputs, keep, **extra)
