"""geovlm.sft_prefix: the batch's shared leading tokens run once, loss and gradients unchanged.

Oracle: float64 ``log_softmax`` of HF's own full logits on the padded batch (every position),
gathered at the labels, summed, and its gradients for every parameter (vision tower included);
with and without activation checkpointing, on both attention backends that take the mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geovlm.data.collate import collate_sft, pad_token_id
from geovlm.data.packing import sequence_lengths
from geovlm.model import disable_checkpointing, enable_checkpointing
from geovlm.packed import mrope_positions
from geovlm.sft import token_nll_sum
from geovlm.sft_prefix import (
    common_prefix_length,
    prefix_sharing_unsupported,
    shared_prefix_mask,
    split_shared_prefix,
)
from tests.test_model import make_sample, tiny_policy
from tests.test_sft import grads_of, oracle


@pytest.fixture(scope="module")
def policy():
    model, processor = tiny_policy(seed=11)
    return model.double(), processor


def batch_of(processor, sizes, seed=5, system_prompt="default"):
    rng = np.random.default_rng(seed)
    samples = [make_sample(rng, i, s) for i, s in enumerate(sizes)]
    if system_prompt == "default":
        return collate_sft(samples, processor, 4096)
    return collate_sft(samples, processor, 4096, system_prompt=system_prompt)


SIZES = [((112, 112),), ((84, 140), (112, 112)), ((140, 112),), ((112, 84),), ((56, 56),)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits-to-keep", "fused-linear"])
def test_nll_and_gradients_equal_the_padded_batch(policy, attn, checkpointing, fused_linear):
    model, processor = policy
    model.config.get_text_config()._attn_implementation = attn
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    try:
        batch = batch_of(processor, SIZES)
        want = oracle(model, batch)
        shared = split_shared_prefix(model, batch, pad_token_id(processor))
        assert shared is not None and shared.prefix_length > 10
        nll, count = token_nll_sum(model, shared, fused_linear=fused_linear)
        assert count == int((batch["labels"][:, 1:] != -100).sum()) > 0
        torch.testing.assert_close(nll.double(), want, rtol=1e-6, atol=1e-8)
        expected, got = grads_of(model, want), grads_of(model, nll)
    finally:
        disable_checkpointing(model)
        model.config.get_text_config()._attn_implementation = "sdpa"
    assert expected.keys() == got.keys() and any(n.startswith("model.visual") for n in got)
    for name, grad in expected.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[name].double(), grad, rtol=1e-5, atol=1e-6 * scale)


def test_the_prefix_runs_once_and_the_rows_shrink(policy):
    """What it is for: the system turn reaches the decoder once, not once per sample."""
    model, processor = policy
    batch = batch_of(processor, SIZES)
    shared = split_shared_prefix(model, batch, pad_token_id(processor))
    lengths = sequence_lengths(batch)
    assert shared.tokens() < sum(lengths)
    assert shared.tokens() < batch["input_ids"].numel()
    # The prefix is the system turn and the start of the user turn, up to the first image.
    text = processor.tokenizer.decode(shared.prefix_ids[0])
    assert text.startswith("<|im_start|>system") and "<|image_pad|>" not in text
    seen = []
    handle = model.model.language_model.embed_tokens.register_forward_hook(
        lambda m, args, out: seen.append(args[0].numel())
    )
    try:
        with torch.no_grad():
            token_nll_sum(model, shared)
    finally:
        handle.remove()
    assert seen == [shared.prefix_length, shared.rest["input_ids"].numel()]


def test_prefix_stops_before_images_labels_and_the_shortest_row():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    labels = torch.full_like(ids, -100)
    positions = torch.arange(6).expand(3, 2, 6).clone()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert common_prefix_length(batch, positions, [99]) == 4  # rows differ at 4
    ids[1, 4] = 9
    assert common_prefix_length(batch, positions, [99]) == 4  # row 1 ends at 5
    labels[:, 3] = 11
    assert common_prefix_length(batch, positions, [99]) == 2  # 2 predicts labelled 3
    labels[:, 3] = -100
    positions[1, :, 2] = 0  # an image placeholder's 3-D position
    assert common_prefix_length(batch, positions, [99]) == 2
    positions[1, :, 2] = 2
    assert common_prefix_length(batch, positions, [7]) == 2  # an image token at its text position
    ids[1, 0] = 4
    assert common_prefix_length(batch, positions, [99]) == 0


def test_no_shared_prefix_means_none(policy):
    """A batch whose rows differ from the first token (no system turn, different images)."""
    model, processor = policy
    batch = batch_of(processor, SIZES[:2], system_prompt=None)
    # With the template's own system turn the rows still share it.
    assert split_shared_prefix(model, batch, pad_token_id(processor)) is not None
    batch["input_ids"][1, 0] = batch["input_ids"][0, 0] + 1
    assert split_shared_prefix(model, batch, pad_token_id(processor)) is None


def test_mask_lets_every_rest_token_see_the_prefix_and_only_its_own_past(policy):
    model, processor = policy
    batch = batch_of(processor, SIZES)
    shared = split_shared_prefix(model, batch, pad_token_id(processor))
    mask = shared_prefix_mask(shared, torch.float32)[:, 0] == 0  # [R, W, Lp + W]
    lp = shared.prefix_length
    assert mask[:, :, :lp].all()
    rest = mask[:, :, lp:]
    segments = shared.segments
    for r in range(rest.shape[0]):
        for q in range(rest.shape[1]):
            allowed = (segments[r] == segments[r, q]) & (torch.arange(rest.shape[2]) <= q)
            assert torch.equal(rest[r, q], allowed)


def test_rest_positions_are_the_unpacked_sample_positions(policy):
    model, processor = policy
    batch = batch_of(processor, SIZES)
    shared = split_shared_prefix(model, batch, pad_token_id(processor))
    full = mrope_positions(model, batch)
    lp = shared.prefix_length
    rests = sorted(
        full[:, b, lp:n].flatten().tolist() for b, n in enumerate(sequence_lengths(batch))
    )
    got = []
    for r in range(shared.segments.shape[0]):
        for s in shared.segments[r].unique():
            real = shared.segments[r] == s
            got.append(shared.rest["position_ids"][:, r, real])
    # Padding continues the row's last sample: each rest is the start of its segment.
    assert len(got) == len(rests)
    for want in rests:
        n = len(want) // 3
        assert any(g.shape[1] >= n and g[:, :n].flatten().tolist() == want for g in got)


def test_flash_attention_is_refused_with_the_reason(policy):
    model, _ = policy
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    try:
        assert "4-D mask" in prefix_sharing_unsupported(model)
    finally:
        model.config.get_text_config()._attn_implementation = "sdpa"


@pytest.mark.parametrize(
    "options, sharded, shared",
    [
        ({}, False, True),
        ({"prompt_sharing": False}, False, False),
        ({"packing": "off"}, False, False),
        ({"packing": "on"}, False, False),
        ({}, True, False),  # FSDP2 / ZeRO-3: the prefix pass's output gets no gradient
    ],
    ids=["default", "sharing-off", "packing-off", "packing-on", "sharded"],
)
def test_model_batch_shares_the_prefix_only_where_it_may(policy, options, sharded, shared):
    from geovlm.config import StageConfig
    from geovlm.sft import model_batch
    from geovlm.sft_prefix import SharedPrefixBatch

    model, processor = policy
    batch = batch_of(processor, SIZES)
    stage = StageConfig(**options)
    laid = model_batch(model, batch, stage, pad_token_id(processor), sharded)
    assert isinstance(laid, SharedPrefixBatch) is shared
    if not shared:
        assert isinstance(laid, dict) and "labels" in laid
