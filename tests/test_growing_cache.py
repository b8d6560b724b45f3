"""geovlm.prefix.GrowingLayer: the decode cache that writes in place holds, after any sequence
of updates, repeats, row selections and crops, exactly what transformers' ``DynamicLayer``
(which concatenates) holds; and decoding with it draws the very completions and log-probs that
decoding with a plain ``DynamicCache`` draws.

Oracles: ``transformers.cache_utils.DynamicLayer`` fed the same calls; the built-in engine run
with ``decoding_cache`` replaced by ``DynamicCache``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from geovlm import prefix
from geovlm.prefix import GrowingLayer, decoding_cache
from tests.test_engines.test_builtin import generate_rollouts
from tests.test_model import make_sample, tiny_policy


def _states(rng: np.random.Generator, rows: int, length: int) -> tuple[torch.Tensor, ...]:
    shape = (rows, 2, length, 3)
    return tuple(torch.as_tensor(rng.standard_normal(shape), dtype=torch.float32) for _ in "kv")


def _assert_same(ours: GrowingLayer, oracle: DynamicLayer, returned=None, expected=None) -> None:
    assert ours.get_seq_length() == oracle.get_seq_length()
    assert torch.equal(ours.keys, oracle.keys) and torch.equal(ours.values, oracle.values)
    if returned is not None:
        assert all(torch.equal(a, b) for a, b in zip(returned, expected, strict=True))


@pytest.mark.parametrize("seed", range(5))
def test_random_update_sequences_equal_the_concatenating_layer(seed):
    rng = np.random.default_rng(seed)
    ours, oracle = GrowingLayer(), DynamicLayer()
    rows = int(rng.integers(1, 4))
    k, v = _states(rng, rows, int(rng.integers(1, 9)))  # the prompt pass
    _assert_same(ours, oracle, ours.update(k, v), oracle.update(k, v))
    repeats = int(rng.integers(1, 4))
    ours.batch_repeat_interleave(repeats)
    oracle.batch_repeat_interleave(repeats)
    rows *= repeats
    _assert_same(ours, oracle)
    longest = oracle.get_seq_length()
    for _ in range(40):  # decode steps, past several doublings of the buffer
        action = rng.random()
        if action < 0.1 and rows > 1:
            keep = torch.as_tensor(np.sort(rng.choice(rows, int(rng.integers(1, rows)), False)))
            ours.batch_select_indices(keep)
            oracle.batch_select_indices(keep)
            rows = len(keep)
        elif action < 0.15 and oracle.get_seq_length() > 1:
            ours.crop(-1)
            oracle.crop(-1)
        k, v = _states(rng, rows, int(rng.integers(1, 3)))
        _assert_same(ours, oracle, ours.update(k, v), oracle.update(k, v))
        longest = max(longest, oracle.get_seq_length())
    assert ours.key_buffer.shape[-2] <= 2 * longest  # grown by doubling, not per step


def test_a_step_writes_in_place_instead_of_copying_the_cache():
    rng = np.random.default_rng(0)
    layer = GrowingLayer()
    layer.update(*_states(rng, 2, 6))
    buffer = layer.key_buffer
    layer.update(*_states(rng, 2, 1))
    assert layer.key_buffer is buffer and layer.keys.data_ptr() == buffer.data_ptr()


def test_updates_that_need_grad_are_refused():
    k, v = (torch.zeros(1, 2, 3, 4, requires_grad=True) for _ in "kv")
    with pytest.raises(RuntimeError, match="without grad"):
        GrowingLayer().update(k, v)
    with torch.no_grad():
        GrowingLayer().update(k, v)


def test_reset_and_invalid_crop():
    rng = np.random.default_rng(1)
    layer = GrowingLayer()
    layer.update(*_states(rng, 1, 4))
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
    layer.reset()
    assert layer.get_seq_length() == 0
    k, v = _states(rng, 1, 2)
    layer.update(k, v)
    assert torch.equal(layer.keys, k)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(seed=3)


def test_the_decoding_cache_replaces_only_full_attention_layers(policy):
    model, _ = policy
    cache = decoding_cache(model)
    plain = DynamicCache(config=model.config.get_text_config())
    layers = model.config.get_text_config().num_hidden_layers
    assert len(cache.layers) == len(plain.layers) == layers
    assert all(type(layer) is GrowingLayer for layer in cache.layers)


@pytest.mark.parametrize("greedy", [True, False])
def test_rollouts_equal_those_decoded_with_a_dynamic_cache(policy, greedy, monkeypatch):
    model, processor = policy
    rng = np.random.default_rng(4)
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (84, 140)))]
    kwargs = {"max_new_tokens": 40, "seed": 2, "return_logprobs": True, "greedy": greedy}
    ours = generate_rollouts(model, processor, samples, 3, **kwargs)
    monkeypatch.setattr(
        prefix, "decoding_cache", lambda m: DynamicCache(config=m.config.get_text_config())
    )
    oracle = generate_rollouts(model, processor, samples, 3, **kwargs)
    assert torch.equal(ours.completion_ids, oracle.completion_ids)
    assert torch.equal(ours.completion_mask, oracle.completion_mask)
    torch.testing.assert_close(ours.logprobs, oracle.logprobs, rtol=0, atol=0)
