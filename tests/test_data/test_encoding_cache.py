"""geovlm.data.encoding_cache: a cached collation equals an uncached one, whatever is redrawn,
edited or evicted, and memory stays within the bound.

Oracle: ``collate_sft`` / ``collate_prompts`` with ``cache=None`` (every sample encoded afresh
by the processor).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from geovlm.data.collate import collate_prompts, collate_sft
from geovlm.data.encoding_cache import EncodingCache
from tests.test_model import make_sample, random_image, tiny_policy


@pytest.fixture(scope="module")
def processor():
    return tiny_policy()[1]


def _scene_samples(rng: np.random.Generator, n_scenes: int) -> list:
    """Two samples per scene that show the same image objects (as the tasks of one synthetic
    scene do), one of them bi-temporal on some scenes."""
    out = []
    for scene in range(n_scenes):
        first = make_sample(rng, 2 * scene)
        images = first.images if scene % 2 else [first.images[0], random_image(rng)]
        second = make_sample(rng, 2 * scene + 1, ((112, 112),) * len(images))
        second.images = list(images)
        out += [first, second]
    return out


def _assert_same(batch: dict, oracle: dict) -> None:
    assert batch.keys() == oracle.keys()
    for key in oracle:
        assert torch.equal(batch[key], oracle[key]), key


@pytest.mark.parametrize("kind", ["sft", "prompt"])
def test_redrawn_batches_equal_fresh_encoding(processor, kind):
    rng = np.random.default_rng()
    samples = _scene_samples(rng, 4)
    cache = EncodingCache()

    def collate(batch, cache):
        if kind == "sft":
            return collate_sft(batch, processor, 4096, cache=cache)
        return collate_prompts(batch, processor, cache=cache)

    for _ in range(6):
        batch = [samples[i] for i in rng.integers(0, len(samples), size=5)]
        _assert_same(collate(batch, cache), collate(batch, None))
    assert cache.hits > 0
    assert cache.misses == len(cache) <= len(samples)


def test_pixels_of_one_scene_are_stored_once(processor):
    rng = np.random.default_rng()
    first = make_sample(rng, 0)
    second = make_sample(rng, 1)
    second.images = first.images
    cache = EncodingCache()
    collate_prompts([first, second], processor, cache=cache)
    encodings = [entry.encoding for entry in cache._entries.values()]
    assert encodings[0]["pixel_values"] is encodings[1]["pixel_values"]
    tokens = sum(v.numel() * v.element_size() for e in encodings for k, v in e.items()
                 if k != "pixel_values")
    pixels = encodings[0]["pixel_values"]
    assert cache.nbytes == tokens + pixels.numel() * pixels.element_size()


def test_a_sample_edited_in_place_is_encoded_again(processor):
    rng = np.random.default_rng()
    sample = make_sample(rng, 0)
    cache = EncodingCache()
    collate_sft([sample], processor, 4096, cache=cache)
    sample.prompt = sample.prompt + " Answer briefly."
    _assert_same(
        collate_sft([sample], processor, 4096, cache=cache),
        collate_sft([sample], processor, 4096, cache=None),
    )
    sample.think = "a new trace"  # changes the response
    sample.images = [random_image(rng)]
    _assert_same(
        collate_sft([sample], processor, 4096, cache=cache),
        collate_sft([sample], processor, 4096, cache=None),
    )
    assert cache.misses == 3 and len(cache) == 1


def test_a_copy_of_a_sample_and_another_system_prompt_are_other_entries(processor):
    rng = np.random.default_rng()
    sample = make_sample(rng, 0)
    copy = dataclasses.replace(sample, prompt="Count the ships.")
    cache = EncodingCache()
    for s in (sample, copy):
        for system in (None, "Be brief."):
            _assert_same(
                collate_prompts([s], processor, system, cache=cache),
                collate_prompts([s], processor, system, cache=None),
            )
    assert cache.misses == 4 and cache.hits == 0


def test_another_processor_or_pixel_budget_is_not_served_stale(processor):
    rng = np.random.default_rng()
    sample = make_sample(rng, 0, ((448, 448),))
    cache = EncodingCache()
    before = collate_prompts([sample], processor, cache=cache)
    other = tiny_policy(min_pixels=28 * 28, max_pixels=112 * 112)[1]
    smaller = collate_prompts([sample], other, cache=cache)
    _assert_same(smaller, collate_prompts([sample], other, cache=None))
    assert smaller["pixel_values"].shape[0] < before["pixel_values"].shape[0]


def test_memory_stays_within_the_bound_and_results_stay_exact(processor):
    rng = np.random.default_rng()
    samples = _scene_samples(rng, 6)
    one = collate_sft(samples[:1], processor, 4096, cache=None)
    size = sum(v.numel() * v.element_size() for v in one.values())
    cache = EncodingCache(max_bytes=3 * size)
    for _ in range(8):
        batch = [samples[i] for i in rng.integers(0, len(samples), size=4)]
        _assert_same(
            collate_sft(batch, processor, 4096, cache=cache),
            collate_sft(batch, processor, 4096, cache=None),
        )
        assert cache.nbytes <= cache.max_bytes
        assert cache.nbytes == sum(
            e.nbytes for e in cache._entries.values()
        ) + sum(p.numel() * p.element_size() for p, _ in cache._pixels.values())
    cache.clear()
    assert cache.nbytes == 0 and len(cache) == 0


def test_a_cached_sample_still_checks_max_length(processor):
    rng = np.random.default_rng()
    sample = make_sample(rng, 0)
    cache = EncodingCache()
    length = collate_sft([sample], processor, 4096, cache=cache)["input_ids"].shape[1]
    with pytest.raises(ValueError, match=f"sample {sample.id}.*over max_length"):
        collate_sft([sample], processor, length - 1, cache=cache)


def test_disabled_and_invalid_bounds():
    with pytest.raises(ValueError, match="max_bytes"):
        EncodingCache(max_bytes=-1)
    calls = []
    cache = EncodingCache(max_bytes=0)
    sample = make_sample(np.random.default_rng(), 0)
    for _ in range(2):
        cache.get(None, sample, "prompt", None, None, (1, 2), lambda: calls.append(1) or {})
    assert len(calls) == 2 and len(cache) == 0


def test_resizing_drops_the_oldest_entries_and_zero_disables(processor):
    rng = np.random.default_rng()
    samples = _scene_samples(rng, 3)
    cache = EncodingCache()
    for sample in samples:
        collate_prompts([sample], processor, cache=cache)
    oldest, newest = list(cache._entries)[0], list(cache._entries)[-1]
    cache.resize(cache.nbytes - 1)
    assert cache.nbytes <= cache.max_bytes
    assert newest in cache._entries and oldest not in cache._entries
    cache.resize(0)
    assert len(cache) == 0 and cache.nbytes == 0
    collate_prompts(samples[:1], processor, cache=cache)
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        cache.resize(-1)


def test_a_run_sizes_the_shared_cache_and_rejects_a_negative_size():
    from geovlm.config import ConfigError, load_config

    assert load_config(None, []).data.encoding_cache_mb == 1024
    with pytest.raises(ConfigError, match="data.encoding_cache_mb"):
        load_config(None, ["data.encoding_cache_mb=-1"])


def test_background_workers_keep_no_encodings():
    from geovlm.data import loader
    from geovlm.data.encoding_cache import SHARED

    def sizes(step):
        return SHARED.max_bytes

    assert list(loader.prefetched(sizes, range(3), workers=1)) == [0, 0, 0]
    assert SHARED.max_bytes > 0  # the main process keeps its cache
