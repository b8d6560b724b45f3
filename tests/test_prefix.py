"""geovlm.prefix: prompts run once per group, completions against their repeated KV cache.

Oracle: the full forward of plain HF on the prompts repeated G times plus the completions
(``forward_hidden`` on the concatenation, sliced at ``Lp - 1``), in float64, for the hidden
states and for the gradients of every parameter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geovlm import prefix
from geovlm.data.collate import collate_prompts, select_rows
from geovlm.data.schema import Sample, Target
from geovlm.model import forward_hidden
from geovlm.prefix import completion_outputs, length_chunks, needed_positions, rope_positions
from tests.test_model import make_sample, tiny_policy


@pytest.fixture(scope="module")
def policy():
    model, processor = tiny_policy(seed=5)
    return model.double(), processor


def _text_only(index: int) -> Sample:
    target = Target(task="vqa", answer="yes", image_size=(112, 112))
    return Sample(
        id=f"t{index}", task="vqa", images=[], prompt="Is it a port? " * index, target=target
    )


def _completions(rng, model, rows: int, length: int):
    """Random non-special tokens, each row cut at a random length (mask 0 after it)."""
    low, high = 10, model.config.get_text_config().vocab_size // 2
    ids = torch.as_tensor(rng.integers(low, high, size=(rows, length)))
    lengths = torch.as_tensor(rng.integers(1, length + 1, size=rows))
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids, mask


def _full(model, prompts, ids, mask, groups):
    """Prompt rows repeated, completions appended: the batch the full path runs."""
    repeated = select_rows(
        prompts,
        torch.arange(len(prompts["input_ids"])).repeat_interleave(groups),
        model.config.image_token_id,
    )
    inputs = dict(repeated)
    inputs["input_ids"] = torch.cat([repeated["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([repeated["attention_mask"], mask], dim=1)
    if "mm_token_type_ids" in repeated:
        inputs["mm_token_type_ids"] = torch.cat(
            [repeated["mm_token_type_ids"], torch.zeros_like(ids)], dim=1
        )
    p = repeated["input_ids"].shape[1]
    return forward_hidden(model, inputs)[:, p - 1 : p - 1 + ids.shape[1]]


def _check(model, prompts, groups, length, seed):
    rng = np.random.default_rng(seed)
    ids, mask = _completions(rng, model, len(prompts["input_ids"]) * groups, length)
    model.train()
    expected = _full(model, prompts, ids, mask, groups)
    shared = completion_outputs(model, prompts, ids, mask, groups)
    assert shared.shape == expected.shape
    keep = mask.bool()
    torch.testing.assert_close(shared[keep], expected[keep], rtol=0, atol=1e-10)
    weights = torch.as_tensor(rng.standard_normal(expected.shape))
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad((expected * weights)[keep].sum(), params, allow_unused=True)
    got = torch.autograd.grad((shared * weights)[keep].sum(), params, allow_unused=True)
    checked = 0
    for name_param, a, b in zip(params, want, got, strict=True):
        assert (a is None) == (b is None), name_param.shape
        if a is not None:
            # Qwen's RMSNorm and RoPE compute in float32 even in a float64 model, so gradients
            # summed over G rows in another order differ by float32 rounding (~1e-7 relative).
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
            checked += 1
    assert checked > 10  # the vision tower and every decoder layer got gradients
    return shared, mask


@pytest.mark.parametrize(("groups", "length"), [(3, 7), (1, 5), (4, 1)])
def test_hidden_states_and_gradients_equal_the_full_forward(policy, groups, length):
    model, processor = policy
    rng = np.random.default_rng(groups)
    samples = [
        make_sample(rng, 0),
        make_sample(rng, 1, ((112, 112), (84, 140))),
        make_sample(rng, 2, ((140, 112),)),
    ]
    _check(model, collate_prompts(samples, processor), groups, length, seed=length)


def test_text_only_prompts_of_different_lengths(policy):
    model, processor = policy
    prompts = collate_prompts([_text_only(1), _text_only(4)], processor)
    assert (prompts["attention_mask"] == 0).any()  # left padding is exercised
    _check(model, prompts, 2, 6, seed=0)


def test_positions_are_the_models_own(policy):
    """With images: get_rope_index's 3-D positions; the completion continues the text axis."""
    model, processor = policy
    rng = np.random.default_rng(0)
    prompts = collate_prompts([make_sample(rng, 0), make_sample(rng, 1, ((84, 140),))], processor)
    positions = rope_positions(model, prompts)
    expected, _ = model.model.get_rope_index(
        prompts["input_ids"],
        image_grid_thw=prompts["image_grid_thw"],
        attention_mask=prompts["attention_mask"],
        mm_token_type_ids=prompts["mm_token_type_ids"],
    )
    assert torch.equal(positions, expected)
    # Vision tokens make the positions differ across the three axes (it is mRoPE, not 1-D).
    assert not torch.equal(positions[1], positions[2])


def test_rows_grouped_by_length_equal_the_full_forward(policy, monkeypatch):
    """With no cost per pass, rows of different lengths run in several groups, each only as
    long as its longest row: the same outputs and gradients, zeros past a group's longest."""
    model, processor = policy
    monkeypatch.setattr(prefix, "PASS_COST_TOKENS", 0)
    groupings = []
    shipped = prefix.length_chunks
    monkeypatch.setattr(
        prefix, "length_chunks", lambda lengths: groupings.append(shipped(lengths)) or groupings[-1]
    )
    rng = np.random.default_rng(11)
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((84, 140),)), make_sample(rng, 2)]
    shared, mask = _check(model, collate_prompts(samples, processor), 4, 9, seed=3)
    assert len(groupings[0]) > 1
    needed = needed_positions(mask)
    widths = [int(needed[group].max()) for group in groupings[0]]
    assert min(widths) < mask.shape[1]
    for group, width in zip(groupings[0], widths, strict=True):
        assert (shared[group, width:] == 0).all()  # positions no row of the group reaches


def test_gradients_do_not_depend_on_the_thread_count():
    """Runs resumed (or rerun) with another thread count must train the same: the rows of a
    prompt gather its KV cache, and the backward of that gather must not sum them in a
    thread-dependent order (advanced indexing's did, at 64 rows of 4 prompts)."""
    model, processor = tiny_policy(seed=5)  # float32, as a run trains
    rng = np.random.default_rng(0)
    prompts = collate_prompts([make_sample(rng, i) for i in range(4)], processor)
    ids, mask = _completions(rng, model, 4 * 16, 24)
    hidden = model.config.get_text_config().hidden_size
    weights = torch.randn(4 * 16, 24, hidden, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()

    def gradients(count: int) -> list[torch.Tensor]:
        torch.set_num_threads(count)
        model.zero_grad(set_to_none=True)
        out = completion_outputs(model, prompts, ids, mask, 16)
        (out * weights)[mask.bool()].sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    try:
        one, two = gradients(1), gradients(2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield [*partition[:k], [first, *partition[k]], *partition[k + 1 :]]


@pytest.mark.parametrize("seed", range(6))
def test_length_chunks_is_the_cheapest_grouping(seed):
    """Against every partition of 7 rows into at most 3 groups (not only contiguous ones in
    length order): the same total of positions run plus the cost per pass."""
    rng = np.random.default_rng(seed)
    lengths = torch.as_tensor(rng.integers(1, 30, size=7))
    pass_cost = int(rng.integers(0, 60))

    def cost(groups):
        return sum(len(g) * int(lengths[list(g)].max()) + pass_cost for g in groups)

    groups = length_chunks(lengths, pass_cost=pass_cost, max_chunks=3)
    assert sorted(torch.cat(groups).tolist()) == list(range(7))
    assert all(torch.equal(g, g.sort().values) for g in groups)
    best = min(cost(p) for p in _partitions(list(range(7))) if len(p) <= 3)
    assert cost([g.tolist() for g in groups]) == best


def test_length_chunks_keeps_one_pass_when_splitting_does_not_pay():
    lengths = torch.tensor([5, 9, 7, 9])
    assert [g.tolist() for g in length_chunks(lengths, pass_cost=100)] == [[0, 1, 2, 3]]
    assert [g.tolist() for g in length_chunks(lengths, pass_cost=0)] == [[1, 3], [2], [0]]


def test_needed_positions_reach_the_last_unmasked_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert needed_positions(mask).tolist() == [2, 4, 1, 3]


def test_row_count_mismatch_is_a_clear_error(policy):
    model, processor = policy
    prompts = collate_prompts([_text_only(1)], processor)
    ids = torch.full((3, 4), 20)
    with pytest.raises(ValueError, match="3 completion rows for 1 prompts x 2 generations"):
        completion_outputs(model, prompts, ids, torch.ones_like(ids), 2)


def test_activation_checkpointing_gives_the_same_gradients(policy):
    """Checkpointed layers replay in the backward pass; the prompt and prefix caches must read
    and write the same states on the replay (a plain cache would grow or be dropped)."""
    from geovlm.model import disable_checkpointing, enable_checkpointing, is_checkpointing

    model, processor = policy
    rng = np.random.default_rng(7)
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (84, 140)))]
    prompts = collate_prompts(samples, processor)
    ids, mask = _completions(rng, model, 2 * 3, 6)
    model.train()
    expected = _full(model, prompts, ids, mask, 3)
    weights = torch.as_tensor(rng.standard_normal(expected.shape))
    params = [p for p in model.parameters() if p.requires_grad]
    keep = mask.bool()
    want = torch.autograd.grad((expected * weights)[keep].sum(), params, allow_unused=True)
    enable_checkpointing(model)
    try:
        assert is_checkpointing(model)
        shared = completion_outputs(model, prompts, ids, mask, 3)
        got = torch.autograd.grad((shared * weights)[keep].sum(), params, allow_unused=True)
    finally:
        disable_checkpointing(model)
    torch.testing.assert_close(shared[keep], expected[keep], rtol=0, atol=1e-10)
    for a, b in zip(want, got, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    # The layers are left as they were.
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in model.modules())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_cuda_bf16_shared_prompt_equals_the_full_forward(attn):
    """On a GPU in bf16 (sdpa, and flash-attention 2's varlen path with left-padded prompts),
    activation checkpointing on: hidden states and gradients agree within bf16 rounding."""
    import importlib.util

    from geovlm.model import enable_checkpointing

    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    model, processor = tiny_policy(
        seed=5, device="cuda", dtype=torch.bfloat16, attn_implementation=attn
    )
    rng = np.random.default_rng(11)
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (84, 140)))]
    prompts = {k: v.cuda() for k, v in collate_prompts(samples, processor).items()}
    ids, mask = (t.cuda() for t in _completions(rng, model, 2 * 4, 9))
    model.train()
    expected = _full(model, prompts, ids, mask, 4)
    weights = torch.randn(expected.shape, device="cuda", generator=None)
    params = [p for p in model.parameters() if p.requires_grad]
    keep = mask.bool()
    want = torch.autograd.grad((expected.float() * weights)[keep].sum(), params)
    enable_checkpointing(model)
    shared = completion_outputs(model, prompts, ids, mask, 4)
    got = torch.autograd.grad((shared.float() * weights)[keep].sum(), params)
    error = (shared - expected).float()[keep].norm() / expected.float()[keep].norm()
    assert float(error) < 2e-2
    flat_want = torch.cat([g.float().flatten() for g in want])
    flat_got = torch.cat([g.float().flatten() for g in got])
    assert float((flat_got - flat_want).norm() / flat_want.norm()) < 5e-2


def test_qwen2_vl_shares_prompts_too(policy, tmp_path):
    """Qwen2-VL (not 2.5): its own get_rope_index and text model; hidden states, gradients and
    greedy rollouts equal the full path."""
    from geovlm.model import build_policy
    from tests.test_engines.test_builtin import generate_rollouts
    from tests.test_model import _save_tiny_qwen2_vl

    _save_tiny_qwen2_vl(tmp_path, policy[1])
    model, processor = build_policy(tmp_path, dtype=torch.float64)
    assert model.config.model_type == "qwen2_vl"
    rng = np.random.default_rng(2)
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (84, 140)))]
    _check(model, collate_prompts(samples, processor), 3, 5, seed=2)
    kwargs = {"num_generations": 2, "max_new_tokens": 6, "greedy": True}
    shared = generate_rollouts(model, processor, samples, share_prompt=True, **kwargs)
    full = generate_rollouts(model, processor, samples, share_prompt=False, **kwargs)
    assert torch.equal(shared.completion_ids, full.completion_ids)


def test_a_transformers_that_drops_the_cache_is_refused(policy, monkeypatch):
    """Without ``_can_checkpoint_with_cache`` a checkpointed layer would silently drop the cache
    (completions computed without their prompt): refused with a clear error instead."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from geovlm.model import disable_checkpointing, enable_checkpointing

    model, processor = policy
    monkeypatch.delattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
    prompts = collate_prompts([_text_only(1)], processor)
    ids = torch.full((2, 3), 20)
    enable_checkpointing(model)
    try:
        with pytest.raises(RuntimeError, match="prompt_sharing=false"):
            completion_outputs(model, prompts, ids, torch.ones_like(ids), 2)
    finally:
        disable_checkpointing(model)
