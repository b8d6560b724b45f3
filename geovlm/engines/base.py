"""The rollout-engine protocol: what goes in (prompts, G, sampling settings), what comes out.

An engine is built once per stage as ``EngineClass(model, processor, setup)`` and then asked,
step after step, for ``generate(samples, num_generations, sampling) -> Rollouts``. After the
policy's weights change (each GRPO step's optimizer updates) the stage calls
``sync_weights(model)`` before the next ``generate``; an engine that samples from the policy
module itself (the built-in one) has nothing to do there, one that holds its own copy of the
weights (vLLM, SGLang) loads them.

``Rollouts`` is what every GRPO pass reads: the prompts once each (model-ready tensors, so the
teacher-forced passes reuse them), the completion ids and mask, the texts the rewards read.
Shapes (N = number of samples * G, Pn = number of samples, P = prompt length, Lc = longest
completion): ``unique_prompt`` ``[Pn, P]`` tensors plus the images; ``completion_ids`` ``[N, Lc]``
right-padded with the pad id; ``completion_mask`` ``[N, Lc]`` int64; ``logprobs`` ``[N, Lc]``
fp32 or None; ``sample_index`` / ``finished`` ``[N]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from geovlm.data.collate import DEFAULT_SYSTEM_PROMPT, select_rows
from geovlm.data.schema import Sample


@dataclass(frozen=True)
class Sampling:
    """How one ``generate`` call draws its completions.

    Attributes:
        max_new_tokens: the most tokens a completion gets (its EOS included).
        temperature: softmax temperature (> 0).
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        greedy: decode the argmax (evaluation) instead of sampling.
        seed: draw reproducibly without touching the caller's RNG state; None draws from it.
        return_logprobs: also return each sampled token's log-prob ``log_softmax(logits / T)``
            (before top-p truncation, as TRL's old log-probs). Off by default: it costs a
            full-vocabulary log-softmax per decode step, and the GRPO passes recompute what they
            need from the teacher-forced forward.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class EngineSetup:
    """What an engine is built with, once per stage. An engine ignores what it has no use for.

    Attributes:
        share_prompt: run each prompt (image included) once for its G completions (the built-in
            engine's shared-prompt decode loop; off: HF ``generate`` on G-times repeated prompts).
        synced_ranks: the model's parameters are sharded over ranks (FSDP2, ZeRO-3), so every
            rank must keep running forwards until all ranks are done.
        max_rows: the most completion rows sampled at once (None: all of a call's rows).
        system_prompt: the system turn of every prompt (``geovlm.data.collate``).
    """

    share_prompt: bool = True
    synced_ranks: bool = False
    max_rows: int | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")


@dataclass
class Rollouts:
    """Completions of a batch of prompts, G per prompt, groups contiguous.

    Attributes:
        unique_prompt: the model-ready prompts, left-padded, once each (``[Pn, P]`` sequence
            tensors, ``pixel_values`` / ``image_grid_thw`` of their images), on the model's
            device; row ``i`` is sample ``i``. ``prompt`` repeats them G times, built only when
            asked for.
        image_token_id: the model's image placeholder id (to gather a row's images).
        completion_ids: ``[N, Lc]`` sampled tokens, right-padded with the pad id.
        completion_mask: ``[N, Lc]`` int64, 1 on the tokens up to and including the first EOS.
        texts: the N decoded completions (up to, excluding, the EOS; special tokens dropped).
        sample_index: ``[N]`` index of each row's sample in the ``samples`` argument.
        finished: ``[N]`` bool, whether the row ended with an EOS (False: cut at max_new_tokens).
        num_generations: G.
        temperature: the sampling temperature.
        logprobs: ``[N, Lc]`` fp32 sampling log-probs at ``temperature``, 0 where masked; None
            unless ``Sampling.return_logprobs`` asked for them.
    """

    unique_prompt: dict[str, torch.Tensor]
    image_token_id: int
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    sample_index: torch.Tensor
    finished: torch.Tensor
    num_generations: int
    temperature: float
    logprobs: torch.Tensor | None = None

    @functools.cached_property
    def prompt(self) -> dict[str, torch.Tensor]:
        """The prompts repeated G times (``[N, P]``, each row's images): row ``r`` is sample
        ``sample_index[r]``'s prompt. Only the full (unshared) forward passes need it."""
        return select_rows(self.unique_prompt, self.sample_index, self.image_token_id)

    @property
    def prompt_length(self) -> int:
        """P: completion token ``j`` sits at position ``P + j`` of ``model_inputs()``."""
        return self.unique_prompt["input_ids"].shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """``[N]`` completion lengths (EOS included)."""
        return self.completion_mask.sum(dim=1)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Prompt + completion as one batch for a teacher-forced forward pass.

        The logits predicting completion token ``j`` are at position ``P - 1 + j``, i.e.
        ``forward_logits(model, inputs)[:, P - 1 : -1]``. Tokens after a row's EOS are masked out
        of the attention; ``mm_token_type_ids`` (text = 0) is extended when present.
        """
        inputs = dict(self.prompt)
        completion = {
            "input_ids": self.completion_ids,
            "attention_mask": self.completion_mask.to(self.prompt["attention_mask"].dtype),
        }
        for key, value in self.prompt.items():
            if key in ("pixel_values", "image_grid_thw"):
                continue
            if value.dim() == 2 and value.shape == self.prompt["input_ids"].shape:
                extra = completion.get(key)
                if extra is None:
                    extra = value.new_zeros(self.completion_ids.shape)
                inputs[key] = torch.cat([value, extra.to(value.dtype)], dim=1)
        return inputs


@runtime_checkable
class RolloutEngine(Protocol):
    """What the GRPO stage and the evaluation call; built as ``cls(model, processor, setup)``.

    ``generate`` returns ``Rollouts`` whose rows ``i*G .. i*G+G-1`` are ``samples[i]``'s
    completions, each continuing exactly the tokens of ``unique_prompt`` row ``i`` (the
    teacher-forced passes score them there), never containing an image / video placeholder or
    vision delimiter, and ending at the first EOS. It must not leave the model's train / eval
    mode or the caller's RNG state changed when ``sampling.seed`` is set.
    """

    def generate(
        self, samples: Sequence[Sample], num_generations: int, sampling: Sampling
    ) -> Rollouts:
        """``num_generations`` completions of each sample's prompt."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        ...


def prompt_preparer(engine: RolloutEngine) -> Callable[[Sequence[Sample]], Any] | None:
    """The engine's optional ``prepare(samples)``, or None.

    An engine may split ``generate``'s CPU work on the prompts (decoding and resizing images, the
    chat template, tokenising) into ``prepare(samples) -> prepared``: CPU only, its result
    picklable, a pure function of the samples. Callers then build the next batches' ``prepared``
    ahead of time in background workers (``geovlm.data.loader.prefetched``) and pass each back
    as ``generate(samples, num_generations, sampling, prepared=prepared)``, which must give
    exactly what ``generate`` without it gives. An engine without ``prepare`` does that work
    inside ``generate``.
    """
    prepare = getattr(engine, "prepare", None)
    return prepare if callable(prepare) else None
