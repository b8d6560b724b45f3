"""The built-in rollout engine: the policy module samples its own completions, in process.

``BuiltinEngine.generate`` collates the prompts once (left-padded) and samples ``G`` completions
of each (groups contiguous: rows ``i*G .. i*G+G-1`` belong to sample ``i``) with the KV cache,
stopping a row at its first EOS (``<|im_end|>`` or ``<|endoftext|>``). With
``setup.share_prompt`` (the default) each prompt, image included, is prefilled once and its KV
cache repeated for its G rows (``geovlm.prefix``), then a lean decode loop samples all rows,
dropping rows from the batch as they finish; without it the prompts are repeated G times and HF
``generate`` samples them, in chunks of ``setup.max_rows`` rows. Both draw from the same
distribution (same warpers, same suppressed tokens); greedy decoding gives the same tokens.

Nothing is computed per decode step beyond what sampling needs, unless the caller asks for
``Sampling.return_logprobs``: then the shared loop also takes ``log_softmax(logits / T)`` of
each step's logits, and under HF generate a logits processor observes the logits of every
decoding step *before* temperature and top-p are applied, keeps ``log_softmax(logits / T)`` in
fp32 for one step, and gathers it at the token generate then chose. So they are the log-probs of
the very distribution sampled from (at the sampling temperature, without the top-p truncation,
as TRL's old log-probs are), at the cost of one ``[rows, V]`` log-softmax per step. The model's
own generation defaults (repetition penalty, top-k, ...) are switched off for the call so they
cannot shift the logits.

The model is the policy module itself, updated in place by the optimizer, so ``sync_weights``
only points the engine at the module it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from geovlm.data.collate import collate_prompts, select_rows
from geovlm.data.schema import Sample
from geovlm.engines.base import EngineSetup, Rollouts, Sampling
from geovlm.engines.completions import (
    assemble_rollouts,
    completion_mask,
    special_ids,
    vision_token_ids,
)
from geovlm.prefix import EncodedPrompts, completion_positions, continue_from, encode_prompts
from geovlm.profiling import nvtx_range
from geovlm.runtime import all_reduce_sum

# One sampled chunk: completion ids and mask ``[rows, L]``, log-probs ``[rows, L]`` or None.
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class BuiltinEngine:
    """Samples with the policy module (see the module docstring); the first ``RolloutEngine``.

    Args:
        model: the policy (a Qwen2-VL / Qwen2.5-VL model, possibly wrapped: DDP, FSDP2 root).
        processor: its processor (chat template, image processor, tokenizer).
        setup: ``share_prompt``, ``synced_ranks``, ``max_rows``, ``system_prompt``.
    """

    def __init__(self, model: PreTrainedModel, processor, setup: EngineSetup | None = None):
        self.model = model
        self.processor = processor
        self.setup = setup or EngineSetup()
        self.eos_ids, self.pad_id = special_ids(processor.tokenizer)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample from ``model`` from now on. The policy is updated in place, so the stage's
        calls after each step pass the module this engine already holds: nothing to copy."""
        self.model = model

    def prepare(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The prompts of ``samples`` collated on the CPU (``collate_prompts``: images decoded
        and resized, chat template, tokens), the part of ``generate`` a background worker can do
        ahead of time (``geovlm.engines.base.prompt_preparer``)."""
        return collate_prompts(samples, self.processor, self.setup.system_prompt)

    def generate(
        self,
        samples: Sequence[Sample],
        num_generations: int,
        sampling: Sampling,
        prepared: dict[str, torch.Tensor] | None = None,
    ) -> Rollouts:
        """``num_generations`` completions of each sample's prompt.

        ``prepared`` is ``self.prepare(samples)`` when the caller built it ahead of time.
        The model is put in eval mode for the call and restored after. With ``sampling.seed``
        the draw is reproducible and the caller's RNG state is left as it was.
        """
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if not samples:
            raise ValueError("generate needs at least one sample")
        model, setup = self.model, self.setup
        device = model.device
        image_token_id = int(model.config.image_token_id)
        prompts = prepared if prepared is not None else self.prepare(samples)
        unique = {key: value.to(device) for key, value in prompts.items()}
        n_rows = len(samples) * num_generations
        chunk_rows = setup.max_rows or n_rows
        config = _generation_config(
            sampling.max_new_tokens,
            sampling.greedy,
            sampling.temperature,
            sampling.top_p,
            self.eos_ids,
            self.pad_id,
            vision_token_ids(model.config),
        )
        saved_config, was_training = model.generation_config, model.training
        devices = [device] if device.type == "cuda" else []
        pieces: list[Chunk] = []
        try:
            model.generation_config = config
            model.eval()
            with torch.random.fork_rng(devices=devices, enabled=sampling.seed is not None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                if setup.share_prompt:
                    per_chunk = max(1, chunk_rows // num_generations)
                    for start in range(0, len(samples), per_chunk):
                        rows = torch.arange(
                            start, min(start + per_chunk, len(samples)), device=device
                        )
                        pieces.append(
                            _sample_shared_prompts(
                                model,
                                select_rows(unique, rows, image_token_id),
                                num_generations,
                                config,
                                sampling,
                                self.eos_ids,
                                setup.synced_ranks,
                            )
                        )
                else:
                    sample_index = torch.arange(len(samples), device=device)
                    sample_index = sample_index.repeat_interleave(num_generations)
                    for start in range(0, n_rows, chunk_rows):
                        rows = sample_index[start : start + chunk_rows]
                        pieces.append(
                            _generate_chunk(
                                model,
                                select_rows(unique, rows, image_token_id),
                                config,
                                sampling,
                                self.eos_ids,
                                setup.synced_ranks,
                            )
                        )
        finally:
            model.generation_config = saved_config
            model.train(was_training)

        width = max(ids.shape[1] for ids, _, _ in pieces)
        logprobs = None
        if sampling.return_logprobs:
            logprobs = _pad_right([lp for _, _, lp in pieces], width, 0.0)
        return assemble_rollouts(
            unique,
            image_token_id,
            _pad_right([ids for ids, _, _ in pieces], width, self.pad_id),
            _pad_right([m for _, m, _ in pieces], width, 0),
            self.processor.tokenizer,
            self.eos_ids,
            num_generations,
            sampling.temperature,
            logprobs,
        )


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
    warpers = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        repetition_penalty=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        use_cache=True,
        suppress_tokens=suppress or None,
        **warpers,
    )


@torch.no_grad()
def _generate_chunk(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    config: GenerationConfig,
    sampling: Sampling,
    eos_ids: list[int],
    synced_ranks: bool,
) -> Chunk:
    """``(completion_ids, completion_mask, logprobs or None)`` of one HF generate call."""
    observer = _SamplingLogprobs(sampling.temperature) if sampling.return_logprobs else None
    sequences = model.generate(
        **inputs,
        generation_config=config,
        logits_processor=LogitsProcessorList([observer] if observer else []),
        synced_gpus=synced_ranks,
    )
    completion = sequences[:, inputs["input_ids"].shape[1] :]
    # Masks are per call: a row cut at max_new_tokens has no EOS, while the padding added when
    # chunks of different lengths are joined is the pad token, itself an EOS (<|endoftext|>).
    mask = completion_mask(completion, eos_ids)
    if observer is None:
        return completion, mask, None
    logprobs = observer.finish(completion[:, -1])
    if logprobs.shape != completion.shape:
        raise RuntimeError(
            f"generate returned {completion.shape[1]} tokens but scored {logprobs.shape[1]} steps"
        )
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


def sample_rows(probs: torch.Tensor) -> torch.Tensor:
    """One token per row ``[rows]`` drawn from ``probs`` ``[rows, V]`` (rows sum to 1).

    Inverse-CDF sampling: one uniform per row against the row's cumulative sum (fp64), the
    first token whose cumulative mass exceeds it. ``torch.multinomial`` draws the same
    distribution but with an exponential variate per vocabulary entry: on the CPU that was
    ~2 ms of a ~6 ms decode step at 128 rows x 1012 tokens, this ~0.1 ms. A token of
    probability 0 (suppressed, outside top-p) is never drawn: its cumulative mass equals its
    predecessor's, which cannot exceed the uniform unless the predecessor's already did.
    """
    cumulative = probs.double().cumsum(dim=-1)
    total = cumulative[:, -1:]
    target = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total
    # u * total can round up to total (once in ~2^53 draws): held just under it, the draw is
    # the last token of mass > 0, never one past it.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target, right=True).squeeze(1)


def _all_done(live_rows: int, synced_ranks: bool) -> bool:
    """Whether no row is still decoding, on every rank when ranks must step together."""
    if not synced_ranks:
        return live_rows == 0
    return all_reduce_sum(live_rows) == 0


@torch.no_grad()
def _sample_shared_prompts(
    model: PreTrainedModel,
    prompts: dict[str, torch.Tensor],
    num_generations: int,
    config: GenerationConfig,
    sampling: Sampling,
    eos_ids: list[int],
    synced_ranks: bool,
) -> Chunk:
    """``(completion_ids, completion_mask, logprobs or None)`` ``[Pn*G, L]`` from ``Pn``
    prompts.

    One prefill of the prompts (NVTX ``rollout/prefill``), their KV cache repeated ``G``
    times, then ``_decode`` (``rollout/decode``).
    """
    with nvtx_range("rollout/prefill"):
        encoded = encode_prompts(model, prompts, output="last_logits")
        logits = encoded.last.float().repeat_interleave(num_generations, dim=0)
        encoded.cache.batch_repeat_interleave(num_generations)
    with nvtx_range("rollout/decode"):
        completion, logps = _decode(
            model, encoded, logits, num_generations, config, sampling, eos_ids, synced_ranks
        )
    mask = completion_mask(completion, eos_ids)
    return completion, mask, None if logps is None else logps * mask


def _decode(
    model: PreTrainedModel,
    encoded: EncodedPrompts,
    logits: torch.Tensor,
    num_generations: int,
    config: GenerationConfig,
    sampling: Sampling,
    eos_ids: list[int],
    synced_ranks: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampled tokens ``[R, steps]`` (and their log-probs when asked), one decode step per
    token.

    ``logits`` ``[R, V]`` predict the first token; ``encoded.cache`` holds the repeated prompts.
    Each step samples (argmax when greedy) from the suppressed logits warped by temperature and
    top-p, as HF generate does; with ``sampling.return_logprobs`` it also records the unwarped
    ``log_softmax(logits / T)`` at the chosen token. A row that emits an EOS leaves the batch
    (its cache rows dropped), so the steps cost what the unfinished rows cost; its remaining
    tokens are the pad token. Honours ``config.min_new_tokens`` (no EOS before it) like HF's
    min-length processor.
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
    logps = None
    if sampling.return_logprobs:
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
            # T = 1 divides by nothing (as HF, which then adds no temperature warper).
            scaled = logits / config.temperature if config.temperature != 1.0 else logits
            warped = top_p_filter(scaled, config.top_p)
            token = sample_rows(warped.softmax(dim=-1))
        else:
            token = logits.argmax(dim=-1)
        # Indexed by ``active`` (no boolean mask): no host sync on a GPU.
        completion[active, step] = torch.where(live, token, completion[active, step])
        if logps is not None:
            logp = torch.log_softmax(logits / sampling.temperature, dim=-1)
            logps[active, step] = torch.where(live, logp.gather(1, token[:, None])[:, 0], 0.0)
        live &= ~torch.isin(token, eos)
        steps = step + 1
        n_live = int(live.sum())  # the step's one host sync
        if steps == width or _all_done(n_live, synced_ranks):
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
    return completion[:, :steps], None if logps is None else logps[:, :steps]


def _pad_right(tensors: list[torch.Tensor], width: int, fill: float) -> torch.Tensor:
    return torch.cat(
        [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors], dim=0
    )
