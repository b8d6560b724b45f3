"""geovlm.engines.builtin: G completions per prompt, and (when asked) their sampling log-probs.

Both decoders (the shared-prompt loop and HF generate on repeated prompts) are checked against
the same oracles: a separate teacher-forced forward pass of plain HF ``model(...)`` on prompt +
completion (built here, not with ``Rollouts.model_inputs``), with float64 ``log_softmax`` at the
sampling temperature; its argmax for greedy decoding; its top-p nucleus for sampling. The
nucleus filter is also checked against HF's ``TopPLogitsWarper``. Log-probs are computed only
when ``Sampling.return_logprobs`` asks for them, without changing what is sampled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geovlm.data.collate import collate_prompts
from geovlm.engines.base import EngineSetup, Sampling
from geovlm.engines.builtin import BuiltinEngine, sample_rows, top_p_filter
from geovlm.model import forward_logits
from tests.test_model import make_sample, tiny_policy

G = 3
EOS_BOOST = 5.0  # added to <|im_end|>'s logit so that rows end at different, early steps


def generate_rollouts(
    model, processor, samples, num_generations, share_prompt=True, max_rows=None, **sampling
):
    """One ``generate`` call of a built-in engine (``sampling``: ``Sampling``'s fields)."""
    engine = BuiltinEngine(model, processor, EngineSetup(share_prompt, max_rows=max_rows))
    return engine.generate(samples, num_generations, Sampling(**sampling))


@pytest.fixture(scope="module")
def policy():
    model, processor = tiny_policy(seed=11)
    return model, processor


@pytest.fixture(params=[True, False], ids=["shared-prompt", "hf-generate"])
def share(request):
    return request.param


@pytest.fixture(scope="module")
def eos_id(policy):
    return policy[1].tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture
def eos_prone(policy, eos_id):
    """The policy with <|im_end|> made likely, as a trained model would emit it."""
    model, _ = policy

    def boost(module, inputs, output):
        output = output.clone()
        output[..., eos_id] += EOS_BOOST
        return output

    handle = model.lm_head.register_forward_hook(boost)
    yield model
    handle.remove()


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng()
    return [
        make_sample(rng, 0),
        make_sample(rng, 1, ((112, 112), (84, 140))),
        make_sample(rng, 2, ((140, 112),)),
    ]


def _teacher_forced_logps(model, processor, samples, rollouts, temperature):
    """float64 log_softmax(logits / T) at each completion token, from one plain forward.

    The vision placeholder / delimiter tokens are removed from the distribution (-inf), as
    generation suppresses them: the sampling distribution is the one over the remaining tokens.
    """
    prompts = collate_prompts(samples, processor)
    index = rollouts.sample_index
    counts = torch.tensor([len(s.images) for s in samples])
    patches = prompts["image_grid_thw"].prod(dim=1).split(counts.tolist())
    pixels = prompts["pixel_values"].split([int(p.sum()) for p in patches])
    grids = prompts["image_grid_thw"].split(counts.tolist())
    inputs = {
        "input_ids": torch.cat([prompts["input_ids"][index], rollouts.completion_ids], dim=1),
        "attention_mask": torch.cat(
            [prompts["attention_mask"][index], rollouts.completion_mask], dim=1
        ),
        "pixel_values": torch.cat([pixels[i] for i in index.tolist()]),
        "image_grid_thw": torch.cat([grids[i] for i in index.tolist()]),
    }
    if "mm_token_type_ids" in prompts:
        inputs["mm_token_type_ids"] = torch.cat(
            [
                prompts["mm_token_type_ids"][index],
                torch.zeros_like(rollouts.completion_ids),
            ],
            dim=1,
        )
    prompt_length = prompts["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, prompt_length - 1 : -1].double()
    config = model.config
    vision = [
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    ]
    logits[..., vision] = float("-inf")
    return torch.log_softmax(logits / temperature, dim=-1)


def test_shapes_groups_and_prompt_rows(policy, samples, share):
    model, processor = policy
    rollouts = generate_rollouts(
        model, processor, samples, G, max_new_tokens=7, seed=0, share_prompt=share,
        return_logprobs=True,
    )
    n = len(samples) * G
    assert rollouts.sample_index.tolist() == [i for i in range(len(samples)) for _ in range(G)]
    assert rollouts.completion_ids.shape == (n, 7) == rollouts.completion_mask.shape
    assert rollouts.logprobs.shape == (n, 7) and rollouts.logprobs.dtype == torch.float32
    assert len(rollouts.texts) == n and rollouts.num_generations == G
    prompts = collate_prompts(samples, processor)
    torch.testing.assert_close(
        rollouts.prompt["input_ids"], prompts["input_ids"].repeat_interleave(G, dim=0)
    )
    assert rollouts.prompt["image_grid_thw"].shape[0] == G * prompts["image_grid_thw"].shape[0]
    inputs = rollouts.model_inputs()
    assert inputs["input_ids"].shape == (n, rollouts.prompt_length + 7)
    assert model.training  # restored after generation


def test_sampling_logprobs_equal_a_teacher_forced_forward(eos_prone, policy, samples, share):
    _, processor = policy
    temperature = 0.7
    rollouts = generate_rollouts(
        eos_prone,
        processor,
        samples,
        G,
        max_new_tokens=9,
        temperature=temperature,
        seed=1,
        share_prompt=share,
        return_logprobs=True,
    )
    logps = _teacher_forced_logps(eos_prone, processor, samples, rollouts, temperature)
    expected = logps.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)
    mask = rollouts.completion_mask.bool()
    torch.testing.assert_close(rollouts.logprobs.double()[mask], expected[mask], rtol=0, atol=1e-4)
    assert (rollouts.logprobs[~mask] == 0).all()
    # The trainer's path: forward_logits on model_inputs(), sliced at P - 1.
    p = rollouts.prompt_length
    with torch.no_grad():
        logits = forward_logits(eos_prone, rollouts.model_inputs())[:, p - 1 : -1].double()
    finite = torch.isfinite(logps)
    via_inputs = torch.log_softmax(logits.masked_fill(~finite, float("-inf")) / temperature, -1)
    torch.testing.assert_close(via_inputs[mask], logps[mask], rtol=0, atol=1e-6)


def test_masks_stop_after_the_first_eos(eos_prone, policy, samples, eos_id, share):
    _, processor = policy
    rollouts = generate_rollouts(
        eos_prone,
        processor,
        samples,
        G,
        max_new_tokens=12,
        max_rows=4,
        seed=2,
        share_prompt=share,
    )
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id
    ids, mask = rollouts.completion_ids, rollouts.completion_mask
    lengths = []
    for row in range(ids.shape[0]):
        eos_at = torch.nonzero((ids[row] == eos_id) | (ids[row] == pad)).squeeze(1)
        stop = int(eos_at[0]) + 1 if len(eos_at) else ids.shape[1]
        lengths.append(stop)
        assert mask[row].tolist() == [1] * stop + [0] * (ids.shape[1] - stop)
        assert rollouts.finished[row] == bool(len(eos_at))
        assert (ids[row, stop:] == pad).all()
        content = ids[row, : stop - 1] if len(eos_at) else ids[row]
        assert rollouts.texts[row] == tokenizer.decode(content, skip_special_tokens=True)
    assert rollouts.lengths.tolist() == lengths
    # The boost makes early stops likely: the test must see both finished and varied lengths.
    assert rollouts.finished.any() and len(set(lengths)) > 1


def test_top_p_samples_stay_inside_the_nucleus(policy, samples, share):
    model, processor = policy
    temperature, top_p = 1.3, 0.2
    rollouts = generate_rollouts(
        model,
        processor,
        samples,
        G,
        max_new_tokens=6,
        temperature=temperature,
        top_p=top_p,
        seed=3,
        share_prompt=share,
    )
    logps = _teacher_forced_logps(model, processor, samples, rollouts, temperature)
    probs = logps.exp()
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Nucleus: the most likely tokens until their mass reaches top_p (the one crossing included).
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    in_nucleus = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p - 1e-9)
    chosen = in_nucleus.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)
    assert chosen[rollouts.completion_mask.bool()].all()
    # Not vacuous: the nucleus is a small part of the vocabulary.
    assert in_nucleus.sum(-1).float().mean() < probs.shape[-1] / 4


def test_greedy_is_deterministic_and_the_argmax(policy, samples, share):
    model, processor = policy
    first = generate_rollouts(
        model, processor, samples, 2, max_new_tokens=6, greedy=True, share_prompt=share,
        return_logprobs=True,
    )
    second = generate_rollouts(
        model,
        processor,
        samples,
        2,
        max_new_tokens=6,
        greedy=True,
        max_rows=5,
        share_prompt=share,
    )
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert first.texts == second.texts
    logps = _teacher_forced_logps(model, processor, samples, first, temperature=1.0)
    mask = first.completion_mask.bool()
    assert torch.equal(logps.argmax(-1)[mask], first.completion_ids[mask])
    expected = logps.gather(-1, first.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(first.logprobs.double()[mask], expected[mask], rtol=0, atol=1e-4)


def test_vision_tokens_are_never_sampled(policy, samples, share):
    """Sampling <|image_pad|> would break the teacher-forced forward of the GRPO loss."""
    model, processor = policy
    config = model.config
    vision = {
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    }

    # Make the image placeholder by far the most likely next token everywhere.
    def favour_image_pad(module, args, output):
        output[..., config.image_token_id] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(favour_image_pad)
    try:
        rollouts = generate_rollouts(
            model, processor, samples[:2], 4, max_new_tokens=6, seed=3, share_prompt=share
        )
    finally:
        handle.remove()
    assert not vision & set(rollouts.completion_ids[rollouts.completion_mask.bool()].tolist())


def test_seed_reproduces_and_keeps_the_callers_rng(policy, samples, share):
    model, processor = policy
    state = torch.random.get_rng_state()
    first = generate_rollouts(
        model, processor, samples[:2], G, max_new_tokens=5, seed=7, share_prompt=share,
        return_logprobs=True,
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    second = generate_rollouts(
        model, processor, samples[:2], G, max_new_tokens=5, seed=7, share_prompt=share,
        return_logprobs=True,
    )
    other = generate_rollouts(
        model, processor, samples[:2], G, max_new_tokens=5, seed=8, share_prompt=share
    )
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert torch.equal(first.logprobs, second.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_checkpoint_generation_defaults_do_not_leak(policy, samples, share):
    """A checkpoint's generation_config (Qwen ships top_k=1, repetition_penalty=1.05) is ignored."""
    model, processor = policy
    saved = model.generation_config
    model.generation_config = type(saved)(
        **{**saved.to_dict(), "top_k": 1, "repetition_penalty": 1.5}
    )
    try:
        rollouts = generate_rollouts(
            model,
            processor,
            samples[:1],
            4,
            max_new_tokens=6,
            temperature=1.0,
            seed=4,
            share_prompt=share,
            return_logprobs=True,
        )
        assert model.generation_config.top_k == 1
    finally:
        model.generation_config = saved
    logps = _teacher_forced_logps(model, processor, samples[:1], rollouts, 1.0)
    expected = logps.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)
    mask = rollouts.completion_mask.bool()  # a row may end early: its padding scores 0
    torch.testing.assert_close(rollouts.logprobs.double()[mask], expected[mask], rtol=0, atol=1e-4)
    # top_k=1 would make all 4 completions identical.
    assert len({tuple(row) for row in rollouts.completion_ids.tolist()}) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_generations": 0}, "num_generations"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_rows": 0}, "max_rows"),
    ],
)
def test_bad_arguments_are_clear_errors(policy, samples, kwargs, message):
    model, processor = policy
    arguments = {"num_generations": 2, "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_rollouts(model, processor, samples[:1], **arguments)
    with pytest.raises(ValueError, match="at least one sample"):
        generate_rollouts(model, processor, [], 2, max_new_tokens=3)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_filter_matches_hf_warper(top_p):
    from transformers import TopPLogitsWarper

    scores = torch.randn(7, 53) * 3
    scores[0, :] = 0.0  # ties: a uniform row
    scores[1, 5] = 40.0  # one token holds almost all the mass
    expected = TopPLogitsWarper(top_p)(torch.zeros(7, 1, dtype=torch.long), scores.clone())
    torch.testing.assert_close(top_p_filter(scores, top_p), expected, rtol=0, atol=0)
    assert top_p_filter(scores, 1.0) is scores


def test_shared_prompt_greedy_equals_hf_generate(policy, samples):
    model, processor = policy
    kwargs = {"num_generations": 2, "max_new_tokens": 8, "greedy": True, "return_logprobs": True}
    shared = generate_rollouts(model, processor, samples, share_prompt=True, **kwargs)
    hf = generate_rollouts(model, processor, samples, share_prompt=False, **kwargs)
    assert torch.equal(shared.completion_ids, hf.completion_ids)
    assert torch.equal(shared.completion_mask, hf.completion_mask)
    assert shared.texts == hf.texts
    torch.testing.assert_close(shared.logprobs, hf.logprobs, rtol=0, atol=1e-5)


def test_shared_prompt_runs_each_image_once(policy, samples):
    """The point of sharing: the vision tower sees each prompt's patches once, not G times."""
    model, processor = policy
    seen = []
    handle = model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        generate_rollouts(model, processor, samples, 4, max_new_tokens=3, seed=0)
        shared = sum(x.shape[0] for x in seen)
        seen.clear()
        generate_rollouts(
            model, processor, samples, 4, max_new_tokens=3, seed=0, share_prompt=False
        )
        repeated = sum(x.shape[0] for x in seen)
    finally:
        handle.remove()
    patches = int(collate_prompts(samples, processor)["image_grid_thw"].prod(dim=1).sum())
    assert shared == patches and repeated == 4 * patches


def test_min_new_tokens_holds_back_the_eos(eos_prone, policy, samples, share, monkeypatch):
    from geovlm.engines import builtin

    make_config = builtin._generation_config

    def at_least_five(*args):
        config = make_config(*args)
        config.min_new_tokens = 5
        return config

    monkeypatch.setattr(builtin, "_generation_config", at_least_five)
    _, processor = policy
    rollouts = generate_rollouts(
        eos_prone, processor, samples, G, max_new_tokens=9, seed=5, share_prompt=share
    )
    assert (rollouts.lengths >= 5).all()
    assert (rollouts.lengths < 9).any()  # the boosted EOS still ends rows once allowed


def test_finished_rows_leave_the_decode_batch(eos_prone, policy, samples):
    """Each decode step runs only the rows still decoding: lm_head sees as many rows as there
    are completions longer than the step (the prompts' prefill first)."""
    _, processor = policy
    seen = []
    handle = eos_prone.lm_head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    try:
        rollouts = generate_rollouts(eos_prone, processor, samples, G, max_new_tokens=10, seed=6)
    finally:
        handle.remove()
    lengths = rollouts.lengths
    assert lengths.min() < lengths.max()  # rows did finish at different steps
    decode_rows = [int((lengths > step).sum()) for step in range(1, int(lengths.max()))]
    assert seen == [len(samples), *decode_rows]


def _log_softmax_ops(run):
    """``run()``'s result and how many log-softmax ops it ran (torch.profiler's op counts)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = run()
    ops = ("aten::log_softmax", "aten::_log_softmax")
    return result, sum(event.count for event in prof.key_averages() if event.key in ops)


def test_log_probs_cost_nothing_unless_asked(eos_prone, policy, samples, share):
    """Without ``return_logprobs`` no decode step runs a log-softmax, and the same seed draws
    the same completions as with it (the log-probs never touch the sampling)."""
    _, processor = policy
    kwargs = {"max_new_tokens": 9, "temperature": 0.8, "seed": 9, "share_prompt": share}
    plain, plain_ops = _log_softmax_ops(
        lambda: generate_rollouts(eos_prone, processor, samples, G, **kwargs)
    )
    scored, scored_ops = _log_softmax_ops(
        lambda: generate_rollouts(eos_prone, processor, samples, G, return_logprobs=True, **kwargs)
    )
    assert plain.logprobs is None and plain_ops == 0
    assert scored_ops >= int(scored.lengths.max())  # one per decode step at least
    assert torch.equal(plain.completion_ids, scored.completion_ids)
    assert torch.equal(plain.completion_mask, scored.completion_mask)
    assert torch.equal(plain.finished, scored.finished) and plain.texts == scored.texts


def test_prompts_prepared_ahead_in_a_worker_give_the_same_rollouts(policy, samples, share):
    """``prepare`` is the CPU half of ``generate``: built in a background process (as the GRPO
    stage and the evaluation do) and passed back, it changes nothing that is sampled."""
    from geovlm.data.loader import prefetched
    from geovlm.engines.base import prompt_preparer

    model, processor = policy
    engine = BuiltinEngine(model, processor, EngineSetup(share))
    prepare = prompt_preparer(engine)
    assert prepare is not None
    (prepared,) = list(prefetched(lambda _: prepare(samples), [0], workers=1))
    sampling = Sampling(max_new_tokens=6, seed=3)
    inline = engine.generate(samples, G, sampling)
    ahead = engine.generate(samples, G, sampling, prepared=prepared)
    torch.testing.assert_close(ahead.completion_ids, inline.completion_ids)
    assert ahead.texts == inline.texts
    for key, value in inline.unique_prompt.items():
        torch.testing.assert_close(ahead.unique_prompt[key], value)


def test_sample_rows_draws_each_rows_distribution():
    """Inverse-CDF sampling against the probabilities themselves: a chi-square test per row
    over 40,000 draws, and tokens of probability 0 (suppressed, outside top-p) never drawn."""
    from scipy.stats import chisquare

    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 12, generator=generator) ** 3
    probs[:, [0, 5, 11]] = 0.0  # the first, a middle and the last token may not be drawn
    probs[2] = 0.0
    probs[2, 7] = 1.0  # a one-hot row
    probs /= probs.sum(dim=1, keepdim=True)
    draws = 40_000
    torch.manual_seed(1)
    tokens = sample_rows(probs.repeat_interleave(draws, dim=0)).view(3, draws)
    for row in range(3):
        counts = torch.bincount(tokens[row], minlength=12)
        allowed = probs[row] > 0
        assert counts[~allowed].sum() == 0
        if allowed.sum() > 1:
            expected = probs[row][allowed].double()
            expected = expected / expected.sum() * draws
            assert chisquare(counts[allowed].double(), expected).pvalue > 1e-3
    assert (tokens[2] == 7).all()


def test_sample_rows_never_lands_past_the_last_token_with_mass(monkeypatch):
    """A uniform that rounds up to the row's whole mass still gives a token of mass > 0."""
    probs = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    monkeypatch.setattr(
        torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype"))
    )
    assert sample_rows(probs).tolist() == [1, 1]


def test_sample_rows_is_reproducible_under_a_seed():
    probs = torch.softmax(torch.randn(64, 30), dim=-1)
    torch.manual_seed(3)
    first = sample_rows(probs)
    torch.manual_seed(3)
    assert torch.equal(first, sample_rows(probs))
