"""What every engine does around its sampler: which tokens end or may not appear in a
completion, the completion mask, and the texts and ``Rollouts`` built from sampled ids.

An engine collates the prompts (``geovlm.data.collate.collate_prompts``), samples
``[N, Lc]`` ids however it likes (right-padded with ``special_ids``'s pad id, vision tokens
suppressed), and hands them to ``assemble_rollouts``.
"""

from __future__ import annotations

import torch

from geovlm.engines.base import Rollouts

EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


def special_ids(tokenizer) -> tuple[list[int], int]:
    """``(eos_ids, pad_id)``: every id that ends a completion, and the id padding it."""
    eos = {tokenizer.convert_tokens_to_ids(token) for token in EOS_TOKENS}
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    eos.discard(None)
    eos.discard(tokenizer.unk_token_id)
    if not eos:
        raise ValueError("the tokenizer has none of the EOS tokens " + ", ".join(EOS_TOKENS))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return sorted(eos), int(pad)


def vision_token_ids(config) -> list[int]:
    """Image / video placeholder and vision delimiter ids: never valid in a completion.

    A sampled ``<|image_pad|>`` would make the teacher-forced forward of prompt + completion
    expect image features that do not exist (a crash in the GRPO loss), so generation must not
    produce them; TRL suppresses them for the same reason.
    """
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(v) for v in (getattr(config, n, None) for n in names) if v is not None})


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """``[N, L]`` int64: 1 up to and including each row's first EOS, all ones without one."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    length = completion_ids.shape[1]
    first = torch.where(
        is_eos.any(dim=1),
        is_eos.int().argmax(dim=1),
        torch.full_like(is_eos[:, 0], length, dtype=torch.long),
    )
    positions = torch.arange(length, device=completion_ids.device)
    return (positions[None, :] <= first[:, None]).long()


def assemble_rollouts(
    unique_prompt: dict[str, torch.Tensor],
    image_token_id: int,
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    tokenizer,
    eos_ids: list[int],
    num_generations: int,
    temperature: float,
    logprobs: torch.Tensor | None = None,
) -> Rollouts:
    """``Rollouts`` of ``[N, Lc]`` completion ids and their mask, groups contiguous.

    ``finished`` marks the rows whose mask covers an EOS; the texts are decoded without it (the
    rewards read them) and without special tokens.
    """
    n_samples = unique_prompt["input_ids"].shape[0]
    if completion_ids.shape[0] != n_samples * num_generations or mask.shape != completion_ids.shape:
        raise ValueError(
            f"completion ids {tuple(completion_ids.shape)} / mask {tuple(mask.shape)} do not "
            f"hold {num_generations} rows for each of {n_samples} prompts"
        )
    device = completion_ids.device
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=device)) & mask.bool()
    content_mask = (mask.bool() & ~is_eos).cpu()
    texts = [
        tokenizer.decode(row[keep], skip_special_tokens=True)
        for row, keep in zip(completion_ids.cpu(), content_mask, strict=True)
    ]
    return Rollouts(
        unique_prompt=unique_prompt,
        image_token_id=int(image_token_id),
        completion_ids=completion_ids,
        completion_mask=mask,
        texts=texts,
        sample_index=torch.arange(n_samples, device=device).repeat_interleave(num_generations),
        finished=is_eos.any(dim=1),
        num_generations=num_generations,
        temperature=float(temperature),
        logprobs=logprobs,
    )
