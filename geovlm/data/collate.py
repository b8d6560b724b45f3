"""Chat messages and model-ready batches for Qwen2-VL / Qwen2.5-VL processors.

``build_messages`` turns a ``Sample`` into chat messages (images as content items, two for
bi-temporal samples). ``collate_sft`` and ``collate_prompts`` turn samples into the dict the
model's ``forward`` / ``generate`` take, whatever keys the installed processor emits:

* sequence keys, ``[B, T]``: ``input_ids`` (padded with the tokenizer's pad id),
  ``attention_mask`` and, on transformers versions that use it, ``mm_token_type_ids``
  (padded with 0); ``collate_sft`` adds ``labels`` ``[B, T]`` (-100 except the response);
* vision keys: ``pixel_values`` ``[sum of patches, C * temporal_patch * patch * patch]`` and
  ``image_grid_thw`` ``[number of images, 3]``, in the order the images occur in the batch.

Images are loaded by ``Sample.load_images`` (a missing file names the sample) and resized with
qwen-vl-utils to the processor's pixel budget, exactly as Qwen's own pipeline does. Each sample
is encoded on its own and padded here, so the padding side is explicit and an over-long sample
is found (and named) before anything is truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from qwen_vl_utils import process_vision_info

from geovlm.data.encoding_cache import SHARED, EncodingCache
from geovlm.data.schema import Sample

DEFAULT_SYSTEM_PROMPT = (
    "You are an expert in Earth-observation imagery. Answer the user's request about the "
    "image(s). First think step by step inside <think> </think> tags, then give the final "
    "answer inside <answer> </answer> tags."
)
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
IGNORE_INDEX = -100
VISION_KEYS = ("pixel_values", "image_grid_thw")


def build_messages(
    sample: Sample, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> list[dict[str, Any]]:
    """Chat messages of ``sample``'s prompt: optional system turn, then the user turn.

    The user turn holds every image (before, after for bi-temporal samples) as
    ``{"type": "image", "image": PIL.Image}`` items followed by the prompt text. With
    ``system_prompt=None`` the chat template inserts its default system turn.
    """
    content: list[dict[str, Any]] = [
        {"type": "image", "image": image} for image in sample.load_images()
    ]
    content.append({"type": "text", "text": sample.prompt})
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": content})
    return messages


def pixel_budget(processor) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of the processor's image processor.

    transformers 5.x keeps them in ``size`` (a dict or ``SizeDict`` with ``shortest_edge`` /
    ``longest_edge`` counting pixels); older processors had ``min_pixels`` / ``max_pixels``.
    """
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None)
    bounds = []
    for edge, legacy in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
        value = size.get(edge) if hasattr(size, "get") else None
        bounds.append(value if value is not None else getattr(image_processor, legacy, None))
    if None in bounds:
        raise ValueError(f"cannot read min/max pixels from {type(image_processor).__name__}")
    return int(bounds[0]), int(bounds[1])


def _encode(
    processor, messages: list[dict[str, Any]], text: str, budget: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Processor output of one conversation text with its images resized by qwen-vl-utils."""
    min_pixels, max_pixels = budget
    sized = []
    for message in messages:
        if isinstance(message["content"], list):
            content = [
                {**item, "min_pixels": min_pixels, "max_pixels": max_pixels}
                if item.get("type") == "image"
                else item
                for item in message["content"]
            ]
            message = {**message, "content": content}
        sized.append(message)
    patch_size = int(getattr(processor.image_processor, "patch_size", 14))
    images, _ = process_vision_info(sized, image_patch_size=patch_size)
    encoded = processor(text=[text], images=images, return_tensors="pt")
    return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}


def _is_sequence(key: str, encodings: list[dict[str, torch.Tensor]]) -> bool:
    if key in VISION_KEYS:
        return False
    return all(enc[key].shape == enc["input_ids"].shape for enc in encodings if key in enc)


def _pad_batch(
    encodings: list[dict[str, torch.Tensor]], pad_id: int, side: str
) -> dict[str, torch.Tensor]:
    """Pad ``[1, T_i]`` sequence tensors to ``[B, T]`` and concatenate the vision tensors."""
    width = max(enc["input_ids"].shape[1] for enc in encodings)
    keys = list(dict.fromkeys(key for enc in encodings for key in enc))
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [enc[key] for enc in encodings if key in enc]
        if not _is_sequence(key, encodings):
            batch[key] = torch.cat(values, dim=0)
            continue
        if len(values) != len(encodings):
            raise ValueError(f"processor returned {key!r} for some samples only")
        fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)
        rows = []
        for value in values:
            pad = value.new_full((1, width - value.shape[1]), fill)
            rows.append(torch.cat([pad, value] if side == "left" else [value, pad], dim=1))
        batch[key] = torch.cat(rows, dim=0)
    return batch


def pad_token_id(processor) -> int:
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor <|endoftext|>")
    return int(pad_id)


def _sft_encoding(
    sample: Sample, processor, system_prompt: str | None, budget: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """``[1, T]`` processor output of ``sample``'s prompt + response, with ``labels``."""
    messages = build_messages(sample, system_prompt)
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    response = sample.response + IM_END
    enc = _encode(processor, messages, prompt + response, budget)
    length = enc["input_ids"].shape[1]
    response_ids = torch.tensor(
        processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    )
    n = response_ids.numel()
    # The response starts after "<|im_start|>assistant\n", a special-token boundary: its
    # tokens are the same alone or in context. Checked, because the labels rely on it.
    if n >= length or not torch.equal(enc["input_ids"][0, -n:], response_ids):
        raise ValueError(
            f"sample {sample.id}: the response does not tokenize the same inside the "
            "conversation; cannot locate the assistant tokens"
        )
    labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)
    labels[0, -n:] = response_ids
    enc["labels"] = labels
    return enc


def _prompt_encoding(
    sample: Sample, processor, system_prompt: str | None, budget: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """``[1, T]`` processor output of ``sample``'s generation prompt."""
    messages = build_messages(sample, system_prompt)
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _encode(processor, messages, prompt, budget)


def _cached(cache: EncodingCache | None, processor, sample: Sample, kind: str,
            system_prompt: str | None, response: str | None, budget: tuple[int, int],
            encode) -> dict[str, torch.Tensor]:
    """``encode()``, through ``cache`` when there is one."""
    if cache is None:
        return encode()
    return cache.get(processor, sample, kind, system_prompt, response, budget, encode)


def collate_sft(
    samples: Sequence[Sample],
    processor,
    max_length: int,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    cache: EncodingCache | None = SHARED,
) -> dict[str, torch.Tensor]:
    """Right-padded SFT batch: prompt + ``sample.response`` + ``<|im_end|>``.

    ``labels`` are -100 everywhere except the response tokens and the closing ``<|im_end|>``
    (the token that teaches the model to stop). A sample longer than ``max_length`` tokens
    (image tokens included) is an error naming it: nothing is silently truncated. Each sample's
    encoding is kept in ``cache`` (the process's shared one by default; None: none) for the
    next time it is drawn.
    """
    if not samples:
        raise ValueError("collate_sft needs at least one sample")
    budget = pixel_budget(processor)
    encodings = []
    for sample in samples:
        enc = _cached(
            cache, processor, sample, "sft", system_prompt, sample.response, budget,
            lambda sample=sample: _sft_encoding(sample, processor, system_prompt, budget),
        )
        length = enc["input_ids"].shape[1]
        if length > max_length:
            raise ValueError(
                f"sample {sample.id} ({sample.source or 'no source'}, task {sample.task}) is "
                f"{length} tokens long, over max_length={max_length}; raise max_length or "
                "shorten the sample"
            )
        encodings.append(enc)
    return _pad_batch(encodings, pad_token_id(processor), side="right")


def collate_prompts(
    samples: Sequence[Sample],
    processor,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    cache: EncodingCache | None = SHARED,
) -> dict[str, torch.Tensor]:
    """Left-padded generation prompts (chat template with ``add_generation_prompt=True``);
    each sample's encoding is kept in ``cache`` as in ``collate_sft``."""
    if not samples:
        raise ValueError("collate_prompts needs at least one sample")
    budget = pixel_budget(processor)
    encodings = []
    for sample in samples:
        encodings.append(_cached(
            cache, processor, sample, "prompt", system_prompt, None, budget,
            lambda sample=sample: _prompt_encoding(sample, processor, system_prompt, budget),
        ))
    return _pad_batch(encodings, pad_token_id(processor), side="left")


def images_per_row(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``[B]`` number of images in each row: runs of image placeholder tokens."""
    is_image = input_ids == image_token_id
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    return starts.sum(dim=1)


def select_rows(
    batch: dict[str, torch.Tensor], rows: torch.Tensor | Sequence[int], image_token_id: int
) -> dict[str, torch.Tensor]:
    """The sub-batch of ``rows`` (repeats allowed), its images' patches gathered to match.

    Repeating each prompt ``G`` times for GRPO:
    ``select_rows(batch, torch.arange(B).repeat_interleave(G), image_token_id)``.
    """
    rows = torch.as_tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
    out = {key: value[rows] for key, value in batch.items() if key not in VISION_KEYS}
    if "image_grid_thw" not in batch:
        return out
    grid = batch["image_grid_thw"]
    counts = images_per_row(batch["input_ids"], image_token_id).tolist()
    if sum(counts) != grid.shape[0]:
        raise ValueError(
            f"batch has {grid.shape[0]} images in image_grid_thw but {sum(counts)} in input_ids"
        )
    patches = grid.prod(dim=1).tolist()
    first_image = [0]
    for count in counts:
        first_image.append(first_image[-1] + count)
    first_patch = [0]
    for count in patches:
        first_patch.append(first_patch[-1] + count)
    image_index = [i for r in rows.tolist() for i in range(first_image[r], first_image[r + 1])]
    patch_index = [p for i in image_index for p in range(first_patch[i], first_patch[i + 1])]
    out["image_grid_thw"] = grid[image_index]
    out["pixel_values"] = batch["pixel_values"][
        torch.tensor(patch_index, dtype=torch.long, device=batch["pixel_values"].device)
    ]
    return out
