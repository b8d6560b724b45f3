"""geovlm.vision_cache: the frozen tower served per image from a cache gives, bitwise, what the
tower computes, whatever images repeat across and within batches, and never a stale output.

Oracle: the tower's own forward (its class's ``forward``) on the same batch, and the whole
model's logits without the cache.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from geovlm.data.collate import collate_prompts
from geovlm.vision_cache import FrozenVisionCache, cache_frozen_vision
from tests.test_model import make_sample, tiny_policy


@pytest.fixture
def policy():
    model, processor = tiny_policy(seed=5, freeze_vision=True)
    return model.eval(), processor


@pytest.fixture(scope="module")
def batches():
    """Prompt batches whose images repeat across and within batches, of two image sizes."""
    rng = np.random.default_rng(8)
    pool = [make_sample(rng, i, ((112, 112),) if i % 3 else ((112, 112), (84, 140)))
            for i in range(6)]
    return pool, [[pool[i] for i in rng.integers(0, len(pool), size=4)] for _ in range(5)]


def _uncached(visual, batch):
    return type(visual).forward(visual, batch["pixel_values"], grid_thw=batch["image_grid_thw"])


def _assert_same(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
        return
    assert type(got) is type(want)
    assert torch.equal(got.pooler_output, want.pooler_output)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


def test_cached_outputs_equal_the_towers_bitwise(policy, batches):
    model, processor = policy
    pool, draws = batches
    assert cache_frozen_vision(model)
    visual = model.model.visual
    cache = visual.forward
    with torch.no_grad():
        for draw in draws:
            batch = collate_prompts(draw, processor)
            _assert_same(visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]),
                         _uncached(visual, batch))
    images = sum(len(s.images) for s in pool)
    assert cache.misses <= images and cache.hits > 0


def test_the_models_logits_are_unchanged(policy, batches):
    model, processor = policy
    batch = collate_prompts(batches[1][0], processor)
    with torch.no_grad():
        want = model(**batch).logits
        cache_frozen_vision(model)
        first = model(**batch).logits  # fills the cache
        again = model(**batch).logits  # served from it
    assert model.model.visual.forward.hits > 0
    assert torch.equal(first, want) and torch.equal(again, want)


def test_changed_weights_are_never_served_stale(policy, batches):
    model, processor = policy
    cache_frozen_vision(model)
    visual = model.model.visual
    batch = collate_prompts(batches[1][0], processor)
    with torch.no_grad():
        visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        next(visual.merger.parameters()).add_(0.01)  # an in-place update, as an optimizer's
        _assert_same(visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]),
                     _uncached(visual, batch))
        state = {k: v + 0.01 for k, v in visual.state_dict().items()}
        visual.load_state_dict(state)
        _assert_same(visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]),
                     _uncached(visual, batch))


def test_a_tower_that_trains_runs_uncached(policy, batches):
    model, processor = policy
    cache_frozen_vision(model)
    visual = model.model.visual
    visual.requires_grad_(True)
    batch = collate_prompts(batches[1][0], processor)
    out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    merged = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert merged.requires_grad
    with torch.no_grad():  # as a reference pass with adapters toggled off: still not cached
        visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    assert visual.forward.misses == visual.forward.hits == 0


@pytest.mark.parametrize(("freeze", "lora_vision", "cached"),
                         [(True, False, True), (False, False, False), (True, True, False)])
def test_a_run_caches_only_a_tower_nothing_trains(policy, freeze, lora_vision, cached):
    from geovlm.config import load_config
    from geovlm.model import patch_policy

    model, _ = policy
    config = load_config(None, [f"model.freeze_vision={str(freeze).lower()}",
                                f"model.lora.enabled={str(lora_vision).lower()}",
                                f"model.lora.vision={str(lora_vision).lower()}"])
    patch_policy(config, model)
    assert isinstance(model.model.visual.forward, FrozenVisionCache) == cached


def test_a_copied_model_gets_its_own_cache(policy, batches):
    model, processor = policy
    cache_frozen_vision(model)
    batch = collate_prompts(batches[1][0], processor)
    with torch.no_grad():
        model(**batch)
        twin = copy.deepcopy(model)
        cache = twin.model.visual.forward
        assert isinstance(cache, FrozenVisionCache) and cache.visual is twin.model.visual
        assert torch.equal(twin(**batch).logits, model(**batch).logits)
        assert cache.misses > 0  # its tower's parameters are other tensors: nothing reused


def test_the_store_is_bounded_and_stays_exact(policy, batches):
    model, processor = policy
    visual = model.model.visual
    visual.forward = FrozenVisionCache(visual, max_images=3)
    with torch.no_grad():
        for draw in batches[1]:
            batch = collate_prompts(draw, processor)
            _assert_same(visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]),
                         _uncached(visual, batch))
            assert len(visual.forward._store) <= 3


def test_a_bfloat16_tower_is_cached_exactly(batches):
    model, processor = tiny_policy(seed=5, freeze_vision=True, dtype="bfloat16")
    model.eval()
    visual = model.model.visual
    cache_frozen_vision(model)
    with torch.no_grad():
        for draw in batches[1][:2]:
            batch = collate_prompts(draw, processor)
            pixels = batch["pixel_values"].to(torch.bfloat16)
            _assert_same(visual(pixels, grid_thw=batch["image_grid_thw"]),
                         _uncached(visual, {**batch, "pixel_values": pixels}))
    assert visual.forward.hits > 0


def test_only_a_cpu_vision_tower_is_wrapped(policy):
    model, _ = policy
    assert cache_frozen_vision(model) and cache_frozen_vision(model)  # idempotent
    assert isinstance(model.model.visual.forward, FrozenVisionCache)
    assert not cache_frozen_vision(torch.nn.Linear(2, 2))
