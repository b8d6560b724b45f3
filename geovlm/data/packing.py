"""Padding-free packing of SFT batches for Qwen2-VL / Qwen2.5-VL.

``pack_batch`` turns a right-padded SFT batch as ``collate_sft`` builds it (``input_ids``,
``attention_mask``, ``labels`` and, when the processor emits it, ``mm_token_type_ids``, all
``[B, T]``; ``pixel_values`` ``[patches, D]``; ``image_grid_thw`` ``[images, 3]``) into ``R <= B``
packed rows of width ``W``, the samples of a row back to back, none split, none dropped:

* ``input_ids``, ``labels``, ``mm_token_type_ids``: ``[R, W]``; no ``attention_mask``;
* ``position_ids``: ``[4, R, W]``. Row 0 holds the text positions, restarting at 0 at each
  sample; rows 1-3 the sample's own 3-D mRoPE positions, exactly what the unpacked forward
  computes (``get_rope_index`` of the model: ``geovlm.packed.mrope_positions``);
* ``pixel_values`` / ``image_grid_thw``: the images in the order their placeholders occur in
  the packed rows (the vision tower's output is scattered into the placeholders in that order).

Rows shorter than the widest are padded at the end: ``input_ids`` with the pad id, ``labels``
with -100, other sequence keys with 0, and positions that continue the row's last sample (+1 per
token, in all four rows). The padding thus extends the last sample's causal block instead of
starting new sequences; being after every real token of its row, no real token attends to it.
The first token of every sample gets label -100, so no sample's last token is trained to predict
the next sample's first token; the padded path never counts a row's first label either, so the
packed and padded batches count exactly the same labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geovlm.data.collate import IGNORE_INDEX, VISION_KEYS, images_per_row

# Sequence keys are packed; the mask is dropped (the positions say where samples start).
_DROPPED_KEYS = ("attention_mask",)


def sequence_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Length of each sample of a right-padded batch; an error if the batch is not one."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, expected):
        raise ValueError("packing needs a right-padded batch (attention_mask 1...1 0...0 per row)")
    if bool((lengths == 0).any()):
        raise ValueError("packing got an empty sample (attention_mask all 0 in a row)")
    return [int(n) for n in lengths.tolist()]


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sample ``lengths`` into rows of ``capacity`` tokens.

    Returns the sample indices of each row, in packing order. Every index occurs exactly once;
    ties in length keep the input order, so the plan is deterministic.
    """
    if capacity < 1:
        raise ValueError(f"row capacity must be positive, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        length = lengths[i]
        if not 1 <= length <= capacity:
            raise ValueError(f"sample {i} is {length} tokens long; rows hold 1..{capacity}")
        for r, room in enumerate(free):
            if length <= room:
                rows[r].append(i)
                free[r] -= length
                break
        else:
            rows.append([i])
            free.append(capacity - length)
    return rows


def _image_spans(batch: dict[str, torch.Tensor], image_token_id: int) -> tuple[list, list]:
    """Per sample, its ``(first, end)`` image indices and ``(first, end)`` patch indices."""
    if "image_grid_thw" not in batch:
        empty = [(0, 0)] * batch["input_ids"].shape[0]
        return empty, empty
    counts = images_per_row(batch["input_ids"], image_token_id).tolist()
    grid = batch["image_grid_thw"]
    if sum(counts) != grid.shape[0]:
        raise ValueError(
            f"batch has {grid.shape[0]} images in image_grid_thw but {sum(counts)} in input_ids"
        )
    patches = [0, *grid.prod(dim=1).cumsum(0).tolist()]
    images, spans = [], []
    first = 0
    for count in counts:
        images.append((first, first + count))
        spans.append((patches[first], patches[first + count]))
        first += count
    return images, spans


def pack_batch(
    batch: dict[str, torch.Tensor],
    positions: torch.Tensor,
    plan: Sequence[Sequence[int]],
    pad_id: int,
    image_token_id: int,
) -> dict[str, torch.Tensor]:
    """The packed batch of a right-padded ``batch`` along ``plan`` (see the module docstring).

    ``positions``: the batch's ``[3, B, T]`` mRoPE positions (``mrope_positions``); ``plan``:
    sample indices per row (``plan_rows``), each sample exactly once.
    """
    lengths = sequence_lengths(batch)
    order = [i for row in plan for i in row]
    if sorted(order) != list(range(len(lengths))):
        raise ValueError(f"the plan must hold each of the {len(lengths)} samples exactly once")
    unknown = set(batch) - set(VISION_KEYS) - set(_DROPPED_KEYS)
    unknown = {key for key in unknown if batch[key].shape != batch["input_ids"].shape}
    if unknown:
        raise ValueError(f"cannot pack batch keys {sorted(unknown)} (images only, no video)")
    sequence_keys = [key for key in batch if key not in VISION_KEYS + _DROPPED_KEYS]
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    width = max(sum(lengths[i] for i in row) for row in plan)
    packed = {
        key: batch[key].new_full((len(plan), width), fills.get(key, 0)) for key in sequence_keys
    }
    position_ids = positions.new_zeros((4, len(plan), width))
    for r, row in enumerate(plan):
        start = 0
        for i in row:
            end = start + lengths[i]
            for key in sequence_keys:
                packed[key][r, start:end] = batch[key][i, : lengths[i]]
            position_ids[0, r, start:end] = torch.arange(lengths[i], device=positions.device)
            position_ids[1:, r, start:end] = positions[:, i, : lengths[i]]
            if "labels" in packed:
                packed["labels"][r, start] = IGNORE_INDEX
            start = end
        if start < width:
            step = torch.arange(1, width - start + 1, device=positions.device)
            position_ids[:, r, start:] = position_ids[:, r, start - 1 : start] + step
    packed["position_ids"] = position_ids
    images, spans = _image_spans(batch, image_token_id)
    if "image_grid_thw" in batch:
        image_index = [j for i in order for j in range(*images[i])]
        patch_index = [p for i in order for p in range(*spans[i])]
        device = batch["image_grid_thw"].device
        packed["image_grid_thw"] = batch["image_grid_thw"][
            torch.tensor(image_index, dtype=torch.long, device=device)
        ]
        packed["pixel_values"] = batch["pixel_values"][
            torch.tensor(patch_index, dtype=torch.long, device=batch["pixel_values"].device)
        ]
    return packed


