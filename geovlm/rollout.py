"""G completions per prompt with HF ``generate``, and their per-token sampling log-probs.

``generate_rollouts`` collates the prompts once (left-padded) and samples ``G`` completions of
each (groups contiguous: rows ``i*G .. i*G+G-1`` belong to sample ``i``) with the KV cache, stopping
a row at its first EOS (``<|im_end|>`` or ``<|endoftext|>``). By default (``share_prompt``) each
prompt, image included, is prefilled once and its KV cache repeated for its G rows
(``geovlm.prefix``), then a lean decode loop samples all rows; with ``share_prompt=False`` the
prompts are repeated G times and HF ``generate`` samples them, in chunks of ``batch_size`` rows.
Both draw from the same distribution (same warpers, same suppressed tokens).

Sampling log-probs come from the decoding itself, not from a second forward pass: the shared
loop takes ``log_softmax(logits / temperature)`` of each step's logits; under HF generate a logits
processor observes the logits of every decoding step *before* temperature and top-p are
applied, keeps ``log_softmax(logits / temperature)`` in fp32 for one step, and gathers it at
the token generate then chose. So they are the log-probs of the very distribution sampled from
(at the sampling temperature, without the top-p truncation, as TRL's old log-probs are), at
the cost of one ``[rows, V]`` buffer. The model's own generation defaults (repetition penalty,
top-k, ...) are switched off for the call so they cannot shift those logits.

Shapes (N = number of samples * G, P = prompt length, Lc = longest completion):
``prompt`` dict of ``[N, P]`` tensors plus the repeated images; ``completion_ids`` ``[N, Lc]``
right-padded with the pad id; ``completion_mask`` ``[N, Lc]`` int64, 1 up to and including the
first EOS; ``logprobs`` ``[N, Lc]`` fp32 (0 where masked); ``sample_index`` ``[N]``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from geovlm.data.collate import DEFAULT_SYSTEM_PROMPT, collate_prompts, select_rows
from geovlm.data.schema import Sample
from geovlm.prefix import EncodedPrompts, completion_positions, continue_from, encode_prompts
from geovlm.profiling import nvtx_range

EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class Rollouts:
    """Completions of a batch of prompts, G per prompt, groups contiguous.

    Attributes:
        unique_prompt: the model-ready prompts, left-padded, once each (``[N / G, P]`` sequence
            tensors, ``pixel_values`` / ``image_grid_thw`` of their images); row ``i`` is sample
            ``i``. ``prompt`` repeats them G times, built only when asked for.
        image_token_id: the model's image placeholder id (to gather a row's images).
        completion_ids: ``[N, Lc]`` sampled tokens, right-padded with the pad id.
        completion_mask: ``[N, Lc]`` int64, 1 on the tokens up to and including the first EOS.
        logprobs: ``[N, Lc]`` fp32 sampling log-probs at ``temperature``; 0 where masked.
        texts: the N decoded completions (up to, excluding, the EOS; special tokens dropped).
        sample_index: ``[N]`` index of each row's sample in the ``samples`` argument.
        finished: ``[N]`` bool, whether the row ended with an EOS (False: cut at max_new_tokens).
        num_generations: G.
        temperature: the temperature the log-probs are taken at.
    """

    unique_prompt: dict[str, torch.Tensor]
    image_token_id: int
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    texts: list[str]
    sample_index: torch.Tensor
    finished: torch.Tensor
    num_generations: int
    temperature: float

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


class _SamplingLogprobs(LogitsProcessor):
    """Records ``log_softmax(logits / T)`` of each step at the token generate picks next.

    HF applies user logits processors after its own (here only the suppression of vision
    tokens, set to -inf) and before the sampling warpers (temperature, top-p), so ``scores`` are
    the model's fp32 logits over the tokens that may be sampled. The token
    chosen at step ``t`` is only visible at step ``t + 1`` (as ``input_ids[:, -1]``), hence one
    step of look-behind; the last step is gathered by ``finish``.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def _gather(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.pending.gather(1, tokens[:, None]).squeeze(1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self._gather(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """``[rows, steps]`` log-probs, once generate has returned its last tokens."""
        if self.pending is not None:
            self._gather(last_tokens)
            self.pending = None
        return torch.stack(self.steps, dim=1)


def _special_ids(tokenizer) -> tuple[list[int], int]:
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


def _completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 up to and including each row's first EOS, all ones for rows without one."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    length = completion_ids.shape[1]
    first = torch.where(
        is_eos.any(dim=1),
        is_eos.int().argmax(dim=1),
        torch.full_like(is_eos[:, 0], length, dtype=torch.long),
    )
    positions = torch.arange(length, device=completion_ids.device)
    return (positions[None, :] <= first[:, None]).long()


def _vision_token_ids(config) -> list[int]:
    """Image / video placeholder and vision delimiter ids: never valid in a completion.

    A sampled ``<|image_pad|>`` would make the teacher-forced forward of prompt + completion
    expect image features that do not exist (a crash in the GRPO loss), so generation must not
    produce them; TRL suppresses them for the same reason.
    """
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(v) for v in (getattr(config, n, None) for n in names) if v is not None})


def _generation_config(
    max_new_tokens: int,
    greedy: bool,
    temperature: float,
    top_p: float,
    eos: list[int],
    pad: int,
    suppress: list[int],
) -> GenerationConfig:
    # Explicit neutral values: unset ones would be filled from the checkpoint's or HF's defaults
    # (top_k=50, Qwen's repetition_penalty=1.05), which would change the sampled distribution.
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        repetition_penalty=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        use_cache=True,
        suppress_tokens=suppress or None,
        **sampling,
    )


def _check(num_generations: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def _generate_chunk(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    config: GenerationConfig,
    temperature: float,
    eos_ids: list[int],
    synced_gpus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(completion_ids, completion_mask, logprobs)`` of one generate call, each ``[rows, L]``."""
    observer = _SamplingLogprobs(temperature)
    sequences = model.generate(
        **inputs,
        generation_config=config,
        logits_processor=LogitsProcessorList([observer]),
        synced_gpus=synced_gpus,
    )
    completion = sequences[:, inputs["input_ids"].shape[1] :]
    logprobs = observer.finish(completion[:, -1])
    if logprobs.shape != completion.shape:
        raise RuntimeError(
            f"generate returned {completion.shape[1]} tokens but scored {logprobs.shape[1]} steps"
        )
    # Masks are per call: a row cut at max_new_tokens has no EOS, while the padding added when
    # chunks of different lengths are joined is the pad token, itself an EOS (<|endoftext|>).
    mask = _completion_mask(completion, eos_ids)
    return completion, mask, logprobs * mask


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``scores`` ``[rows, V]`` with the tokens outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (HF's ``TopPLogitsWarper``: a token is dropped when the mass of the tokens less likely than
    it, itself included, is at most ``1 - top_p``; the most likely token always stays).
    """
    if top_p >= 1.0:
        return scores
    ordered, order = torch.sort(scores, dim=-1)
    tail_mass = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = tail_mass <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _all_done(live_rows: int, synced_gpus: bool) -> bool:
    """Whether no row is still decoding, on every rank when ranks must step together."""
    if not synced_gpus:
        return live_rows == 0
    from geovlm.runtime import all_reduce_sum

    return all_reduce_sum(live_rows) == 0


@torch.no_grad()
def _sample_shared_prompts(
    model: PreTrainedModel,
    prompts: dict[str, torch.Tensor],
    num_generations: int,
    config: GenerationConfig,
    temperature: float,
    eos_ids: list[int],
    synced_gpus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(completion_ids, completion_mask, logprobs)`` ``[P*G, L]`` from ``P`` prompts.

    One prefill of the ``P`` prompts (NVTX ``rollout/prefill``), their KV cache repeated ``G``
    times, then ``_decode`` (``rollout/decode``).
    """
    with nvtx_range("rollout/prefill"):
        encoded = encode_prompts(model, prompts, output="last_logits")
        logits = encoded.last.float().repeat_interleave(num_generations, dim=0)
        encoded.cache.batch_repeat_interleave(num_generations)
    with nvtx_range("rollout/decode"):
        completion, logps = _decode(
            model, encoded, logits, num_generations, config, temperature, eos_ids, synced_gpus
        )
    completion_mask = _completion_mask(completion, eos_ids)
    return completion, completion_mask, logps * completion_mask


def _decode(
    model: PreTrainedModel,
    encoded: EncodedPrompts,
    logits: torch.Tensor,
    num_generations: int,
    config: GenerationConfig,
    temperature: float,
    eos_ids: list[int],
    synced_gpus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled tokens and their log-probs ``[R, steps]``, one decode step per token.

    ``logits`` ``[R, V]`` predict the first token; ``encoded.cache`` holds the repeated prompts.
    Each step samples (argmax when greedy) from the suppressed logits warped by temperature and
    top-p, as HF generate does, and records the unwarped ``log_softmax(logits / temperature)``
    at the chosen token. A row that emits an EOS leaves the batch (its cache rows dropped), so
    the steps cost what the unfinished rows cost; its remaining tokens are the pad token.
    Honours ``config.min_new_tokens`` (no EOS before it) like HF's min-length processor.
    """
    mask = encoded.attention_mask.repeat_interleave(num_generations, dim=0)
    first_position = completion_positions(encoded.positions, 1).repeat_interleave(
        num_generations, dim=0
    )
    rows, device = logits.shape[0], logits.device
    suppress = torch.tensor(config.suppress_tokens or [], dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, device=device)
    width = config.max_new_tokens
    completion = torch.full((rows, width), config.pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(rows, width, dtype=torch.float32, device=device)
    # The batch shrinks as rows finish: ``active`` maps its rows to output rows, ``live`` marks
    # those still decoding (finished rows stay only while a synced rank waits on others).
    active = torch.arange(rows, device=device)
    live = torch.ones(rows, dtype=torch.bool, device=device)
    min_new_tokens = config.min_new_tokens or 0
    steps = 0
    for step in range(width):
        logits[:, suppress] = float("-inf")
        if step < min_new_tokens:  # as HF's MinNewTokensLengthLogitsProcessor
            logits[:, eos] = float("-inf")
        if config.do_sample:
            warped = top_p_filter(logits / config.temperature, config.top_p)
            token = torch.multinomial(warped.softmax(dim=-1), 1).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits / temperature, dim=-1).gather(1, token[:, None])[:, 0]
        # Indexed by ``active`` (no boolean mask): no host sync on a GPU.
        completion[active, step] = torch.where(live, token, completion[active, step])
        logps[active, step] = torch.where(live, logp, 0.0)
        live &= ~torch.isin(token, eos)
        steps = step + 1
        n_live = int(live.sum())  # the step's one host sync
        if steps == width or _all_done(n_live, synced_gpus):
            break
        if 0 < n_live < live.shape[0]:
            keep = live.nonzero().squeeze(1)
            encoded.cache.batch_select_indices(keep)
            mask, first_position, active = mask[keep], first_position[keep], active[keep]
            token, live = token[keep], live[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = continue_from(
            model, encoded, token[:, None], mask, first_position + step, "last_logits"
        )[:, -1].float()
    return completion[:, :steps], logps[:, :steps]


def _pad_right(tensors: list[torch.Tensor], width: int, fill: float) -> torch.Tensor:
    return torch.cat(
        [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors], dim=0
    )


def generate_rollouts(
    model: PreTrainedModel,
    processor,
    samples: Sequence[Sample],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    seed: int | None = None,
    greedy: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    synced_gpus: bool = False,
    share_prompt: bool = True,
) -> Rollouts:
    """Sample ``num_generations`` completions for each sample's prompt.

    ``batch_size`` caps the rows (prompt copies) sampled at once (default: all at once; with
    ``share_prompt`` a chunk holds whole groups, at least one). ``share_prompt`` prefills each
    prompt once for its group (see the module docstring).
    ``seed`` makes the sampling reproducible without touching the caller's RNG state.
    ``greedy`` decodes the argmax (evaluation); log-probs are then still taken at
    ``temperature``. ``synced_gpus`` keeps sharded (FSDP / ZeRO-3) ranks stepping together until
    every rank is done; a rank stops scoring once its own rows are. The model is put in eval mode
    for the call and restored after.
    """
    _check(num_generations, max_new_tokens, temperature, top_p)
    if not samples:
        raise ValueError("generate_rollouts needs at least one sample")
    tokenizer = processor.tokenizer
    eos, pad = _special_ids(tokenizer)
    image_token_id = model.config.image_token_id
    device = model.device

    prompts = collate_prompts(samples, processor, system_prompt)
    unique = {key: value.to(device) for key, value in prompts.items()}
    sample_index = torch.arange(len(samples), device=device).repeat_interleave(num_generations)
    n_rows = sample_index.numel()
    chunk = n_rows if batch_size is None else int(batch_size)
    if chunk < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    config = _generation_config(
        max_new_tokens, greedy, temperature, top_p, eos, pad, _vision_token_ids(model.config)
    )
    saved_config, was_training = model.generation_config, model.training
    devices = [device] if device.type == "cuda" else []
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        model.generation_config = config
        model.eval()
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if share_prompt:
                per_chunk = max(1, chunk // num_generations)
                for start in range(0, len(samples), per_chunk):
                    rows = torch.arange(start, min(start + per_chunk, len(samples)), device=device)
                    pieces.append(
                        _sample_shared_prompts(
                            model,
                            select_rows(unique, rows, image_token_id),
                            num_generations,
                            config,
                            temperature,
                            eos,
                            synced_gpus,
                        )
                    )
            else:
                for start in range(0, n_rows, chunk):
                    rows = sample_index[start : start + chunk]
                    inputs = select_rows(unique, rows, image_token_id)
                    pieces.append(
                        _generate_chunk(model, inputs, config, temperature, eos, synced_gpus)
                    )
    finally:
        model.generation_config = saved_config
        model.train(was_training)

    width = max(ids.shape[1] for ids, _, _ in pieces)
    completion_ids = _pad_right([ids for ids, _, _ in pieces], width, pad)
    mask = _pad_right([m for _, m, _ in pieces], width, 0)
    logps = _pad_right([lp for _, _, lp in pieces], width, 0.0)
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=device)) & mask.bool()
    finished = is_eos.any(dim=1)
    # Drop the EOS before decoding: the texts are what the rewards read.
    content_mask = (mask.bool() & ~is_eos).cpu()
    texts = [
        tokenizer.decode(row[keep], skip_special_tokens=True)
        for row, keep in zip(completion_ids.cpu(), content_mask, strict=True)
    ]
    return Rollouts(
        unique_prompt=unique,
        image_token_id=int(image_token_id),
        completion_ids=completion_ids,
        completion_mask=mask,
        logprobs=logps,
        texts=texts,
        sample_index=sample_index,
        finished=finished,
        num_generations=num_generations,
        temperature=float(temperature),
    )
