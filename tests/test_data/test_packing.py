"""geovlm.data.packing and the SFT packing rule (geovlm.sft.packing_capacity).

Oracles: the padded batch's forward (summed token NLL and every parameter's gradient; float32,
SDPA and eager), each sample collated and rope-indexed alone (the ids, labels, images and mRoPE
positions its unpacked forward uses), transformers' own ``find_packed_sequence_indices`` (the
sequences the mask builder sees in the packed positions), and the first-fit invariants.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import find_packed_sequence_indices

from geovlm import packed
from geovlm.config import load_config
from geovlm.data.collate import IGNORE_INDEX, collate_sft
from geovlm.data.packing import pack_batch, plan_rows, sequence_lengths
from geovlm.model import build_policy, forward_logits
from geovlm.packed import mrope_positions, pack_for_model, packing_unsupported
from geovlm.sft import check_packing, packing_capacity, token_nll_sum
from tests.test_model import _save_tiny_qwen2_vl, make_sample, tiny_policy

# Different image sizes (hence grids and token counts), one bi-temporal pair.
IMAGE_SIZES = [((112, 112),), ((56, 84),), ((84, 140),), ((112, 112), (56, 84)), ((56, 56),)]
PAD_ID = 0
IMAGE_TOKEN = 7


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(seed=3)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng()
    return [make_sample(rng, i, sizes) for i, sizes in enumerate(IMAGE_SIZES)]


@pytest.fixture(scope="module")
def batch(policy, samples):
    return collate_sft(samples, policy[1], 4096)


@pytest.fixture(params=["sdpa", "eager"])
def model(request, policy):
    model = policy[0]
    model.set_attn_implementation(request.param)
    yield model
    model.set_attn_implementation("sdpa")


def nll_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    nll, count = token_nll_sum(model, batch)
    nll.backward()
    grads = {
        name: p.grad.double().clone() for name, p in model.named_parameters() if p.grad is not None
    }
    return float(nll.detach()), count, grads


CAPACITIES = {
    # The longest sample fills its row exactly; nothing else fits beside it.
    "exact": lambda lengths: max(lengths),
    "several": lambda lengths: max(max(lengths), sum(lengths) // 2),
    "one": lambda lengths: sum(lengths),
}


@pytest.mark.parametrize("layout", list(CAPACITIES))
def test_packed_nll_and_gradients_equal_the_padded_batch(model, batch, layout):
    lengths = sequence_lengths(batch)
    capacity = CAPACITIES[layout](lengths)
    packed = pack_for_model(model, batch, capacity, PAD_ID)
    rows, width = packed["input_ids"].shape
    assert width <= capacity and "attention_mask" not in packed
    if layout == "exact":
        assert width == capacity == max(lengths) and rows == len(lengths)
    if layout == "several":
        assert 1 < rows < len(lengths)
        assert bool((packed["labels"][:, -1] == IGNORE_INDEX).any())  # a padded row
    if layout == "one":
        assert rows == 1 and width == sum(lengths)

    nll, count, grads = nll_and_grads(model, batch)
    packed_nll, packed_count, packed_grads = nll_and_grads(model, packed)
    assert packed_count == count
    assert packed_nll == pytest.approx(nll, rel=1e-5)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(packed_grads) == trainable
    for name, grad in grads.items():
        scale = float(grad.abs().max()) + 1e-12
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=2e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_qwen2_vl_packs_too(policy, samples, tmp_path):
    """Qwen2-VL (not 2.5): its own get_rope_index and text model, the same packed contract."""
    _save_tiny_qwen2_vl(tmp_path, policy[1])
    model, processor = build_policy(tmp_path)
    assert model.config.model_type == "qwen2_vl"
    batch = collate_sft(samples, processor, 4096)
    lengths = sequence_lengths(batch)
    packed = pack_for_model(model, batch, max(max(lengths), sum(lengths) // 2), PAD_ID)
    assert packed["input_ids"].shape[0] < len(lengths)
    nll, count, grads = nll_and_grads(model, batch)
    packed_nll, packed_count, packed_grads = nll_and_grads(model, packed)
    assert packed_count == count
    assert packed_nll == pytest.approx(nll, rel=1e-5)
    for name, grad in grads.items():
        scale = float(grad.abs().max()) + 1e-12
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=2e-5 * scale)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["flash_attention_2", "sdpa"])
def test_cuda_packed_nll_and_gradients_equal_the_padded_batch(samples, attn):
    """On a GPU: flash-attention 2 (bf16, varlen over the one packed row) and SDPA (float32,
    block-diagonal mask over rows of the longest sample)."""
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    model, processor = tiny_policy(seed=3, device="cuda", attn_implementation=attn, dtype=dtype)
    batch = {k: v.cuda() for k, v in collate_sft(samples, processor, 4096).items()}
    lengths = sequence_lengths(batch)
    packed = pack_for_model(model, batch, max(max(lengths), sum(lengths) // 2), PAD_ID)
    assert packed["input_ids"].shape[0] == (1 if attn == "flash_attention_2" else 2)
    nll, count, grads = nll_and_grads(model, batch)
    packed_nll, packed_count, packed_grads = nll_and_grads(model, packed)
    assert packed_count == count
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert packed_nll == pytest.approx(nll, rel=tol)
    want = torch.cat([grads[name].flatten() for name in sorted(grads)])
    got = torch.cat([packed_grads[name].flatten() for name in sorted(grads)])
    assert float((got - want).norm() / want.norm()) < 10 * tol


def test_packing_really_separates_the_samples(policy, batch):
    """Control for the test above: the same row without the position restarts (one long
    sequence) changes the logits of every sample after the first, by far more than the
    tolerances above, so equality there is the block-diagonal mask's doing."""
    model = policy[0]
    packed = pack_for_model(model, batch, sum(sequence_lengths(batch)), PAD_ID)
    joined = dict(packed, position_ids=packed["position_ids"].clone())
    joined["position_ids"][0] = torch.arange(packed["input_ids"].shape[1])
    with torch.no_grad():
        change = (forward_logits(model, joined) - forward_logits(model, packed)).abs()
    first_end = int(packed["position_ids"][0, 0, 1:].eq(0).nonzero()[0]) + 1
    assert float(change[0, :first_end].max()) < 1e-5
    assert float(change[0, first_end:].max()) > 0.1


def test_rows_hold_each_sample_as_its_unpacked_forward_sees_it(policy, samples, batch):
    model, processor = policy
    alone = [collate_sft([sample], processor, 4096) for sample in samples]
    plan = [[3, 0], [1, 4, 2]]  # any order, not only first-fit-decreasing
    packed = pack_batch(batch, mrope_positions(model, batch), plan, PAD_ID,
                        model.config.image_token_id)
    lengths = [single["input_ids"].shape[1] for single in alone]
    assert packed["input_ids"].shape == (2, max(sum(lengths[i] for i in row) for row in plan))
    for r, row in enumerate(plan):
        start = 0
        for i in row:
            single, end = alone[i], start + lengths[i]
            torch.testing.assert_close(packed["input_ids"][r, start:end], single["input_ids"][0])
            torch.testing.assert_close(
                packed["mm_token_type_ids"][r, start:end], single["mm_token_type_ids"][0]
            )
            expected_labels = single["labels"][0].clone()
            expected_labels[0] = IGNORE_INDEX
            torch.testing.assert_close(packed["labels"][r, start:end], expected_labels)
            rope, _ = model.model.get_rope_index(
                single["input_ids"],
                mm_token_type_ids=single["mm_token_type_ids"],
                image_grid_thw=single["image_grid_thw"],
            )
            torch.testing.assert_close(packed["position_ids"][1:, r, start:end], rope[:, 0])
            torch.testing.assert_close(
                packed["position_ids"][0, r, start:end], torch.arange(lengths[i])
            )
            start = end
        tail = packed["position_ids"][:, r, start - 1 :]
        assert bool((tail.diff(dim=-1) == 1).all())  # padding continues the last sample
        assert bool((packed["labels"][r, start:] == IGNORE_INDEX).all())
    order = [i for row in plan for i in row]
    torch.testing.assert_close(
        packed["image_grid_thw"], torch.cat([alone[i]["image_grid_thw"] for i in order])
    )
    torch.testing.assert_close(
        packed["pixel_values"], torch.cat([alone[i]["pixel_values"] for i in order])
    )


# ---- packing invariants on synthetic batches (no model) -------------------------------------

@st.composite
def synthetic_batches(draw):
    """A right-padded batch of text and image-placeholder runs, each patch tagged with its
    (sample, image, patch) so that reordering is visible, random mRoPE positions, a capacity."""
    n = draw(st.integers(1, 7))
    ids, grids, patches = [], [], []
    for i in range(n):
        tokens: list[int] = [draw(st.integers(20, 99))]
        for image in range(draw(st.integers(0, 2))):
            side = draw(st.integers(1, 3))
            tokens += [IMAGE_TOKEN] * side * side + [draw(st.integers(20, 99))]
            grids.append([1, 2 * side, 2 * side])
            patches += [[i, image, p] for p in range(4 * side * side)]
        tokens += draw(st.lists(st.integers(20, 99), max_size=25))
        ids.append(tokens)
    width = max(map(len, ids))
    input_ids = torch.full((n, width), PAD_ID)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, tokens in enumerate(ids):
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    labels = torch.where(mask.bool() & (torch.rand(n, width) < 0.5), input_ids, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if grids:
        batch["image_grid_thw"] = torch.tensor(grids)
        batch["pixel_values"] = torch.tensor(patches, dtype=torch.float32)
    lengths = [len(tokens) for tokens in ids]
    capacity = draw(st.integers(max(lengths), 2 * sum(lengths)))
    return batch, torch.randint(0, 500, (3, n, width)), capacity


@settings(max_examples=150, deadline=None)
@given(synthetic_batches())
def test_packed_rows_keep_every_sample_once_with_the_right_restarts(case):
    batch, positions, capacity = case
    lengths = sequence_lengths(batch)
    plan = plan_rows(lengths, capacity)
    packed = pack_batch(batch, positions, plan, PAD_ID, IMAGE_TOKEN)
    assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
    assert packed["input_ids"].shape[1] == max(sum(lengths[i] for i in row) for row in plan)
    assert packed["input_ids"].shape[1] <= capacity
    sequences = find_packed_sequence_indices(packed["position_ids"][0])
    if sequences is None:  # transformers' shorthand for one sequence per row
        sequences = torch.zeros_like(packed["input_ids"])
    for r, row in enumerate(plan):
        start = 0
        for k, i in enumerate(row):
            end = start + lengths[i]
            n = lengths[i]
            assert torch.equal(packed["input_ids"][r, start:end], batch["input_ids"][i, :n])
            assert torch.equal(packed["position_ids"][1:, r, start:end], positions[:, i, :n])
            assert int(packed["labels"][r, start]) == IGNORE_INDEX
            assert torch.equal(packed["labels"][r, start + 1 : end], batch["labels"][i, 1:n])
            # The mask builder sees exactly this sample here (padding joins the last one).
            stop = end if k + 1 < len(row) else packed["input_ids"].shape[1]
            assert bool((sequences[r, start:stop] == k).all())
            start = end
        assert bool((packed["labels"][r, start:] == IGNORE_INDEX).all())
        assert bool((packed["input_ids"][r, start:] == PAD_ID).all())
    order = [i for row in plan for i in row]
    if "pixel_values" in batch:
        tags = packed["pixel_values"][:, 0].long().tolist()
        assert tags == [i for i in order for t in batch["pixel_values"][:, 0].long().tolist()
                        if t == i]
        grids_by_sample = {i: [] for i in order}
        for grid, sample in zip(batch["image_grid_thw"].tolist(),
                                _image_owner(batch["input_ids"]), strict=True):
            grids_by_sample[sample].append(grid)
        expected = [grid for i in order for grid in grids_by_sample[i]]
        assert packed["image_grid_thw"].tolist() == expected


def _image_owner(input_ids: torch.Tensor) -> list[int]:
    """The sample of each image run, in batch order (row-major)."""
    owners = []
    for i, row in enumerate(input_ids.tolist()):
        owners += [i for a, b in zip([None, *row], row, strict=False)
                   if b == IMAGE_TOKEN and a != IMAGE_TOKEN]
    return owners


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=30), st.integers(0, 100))
def test_plan_rows_is_a_first_fit_decreasing_packing(lengths, extra):
    capacity = max(lengths) + extra
    plan = plan_rows(lengths, capacity)
    assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in plan]
    assert max(loads) <= capacity
    assert len(plan) >= -(-sum(lengths) // capacity)
    firsts = [lengths[row[0]] for row in plan]
    assert firsts == sorted(firsts, reverse=True)
    for i, row in enumerate(plan):
        assert [lengths[j] for j in row] == sorted((lengths[j] for j in row), reverse=True)
        for j in range(i + 1, len(plan)):
            # First fit: row j was opened because its first sample fitted no earlier row.
            assert loads[i] + firsts[j] > capacity


# ---- bad input ------------------------------------------------------------------------------

def test_bad_batches_and_plans_are_named_errors(batch, policy):
    model = policy[0]
    positions = mrope_positions(model, batch)
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch(dict(batch, attention_mask=batch["attention_mask"].flip(1)), positions,
                   [[0]], PAD_ID, IMAGE_TOKEN)
    with pytest.raises(ValueError, match="exactly once"):
        pack_batch(batch, positions, [[0, 1], [2, 3]], PAD_ID, model.config.image_token_id)
    with pytest.raises(ValueError, match="rows hold"):
        plan_rows([5, 9], 8)
    with pytest.raises(ValueError, match="capacity"):
        plan_rows([1], 0)
    video = dict(batch, pixel_values_videos=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="pixel_values_videos"):
        pack_batch(video, positions, [[0, 1, 2, 3, 4]], PAD_ID, model.config.image_token_id)


def fake_model(model_type="qwen2_5_vl", attn="flex_attention"):
    text = SimpleNamespace(_attn_implementation=attn)
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type,
                                                  get_text_config=lambda: text))


def test_unsupported_models_are_named():
    assert "llava" in packing_unsupported(fake_model(model_type="llava"))
    assert "flex_attention" in packing_unsupported(fake_model())


# ---- the SFT rule ---------------------------------------------------------------------------

def stage(mode: str):
    return dataclasses.replace(load_config(None, []).stages[0], packing=mode)


def padded(lengths: list[int]) -> dict[str, torch.Tensor]:
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": mask * 30, "attention_mask": mask, "labels": mask * 30}


def test_sft_packing_rule(policy, batch, monkeypatch):
    model = policy[0]
    assert packing_capacity(model, padded([40, 90, 50]), stage("off")) is None
    assert packing_capacity(model, padded([40, 90, 50]), stage("on")) == stage("on").max_length
    # auto with SDPA: rows no wider than the longest sample, and only when that saves rows.
    assert packing_capacity(model, padded([40, 90, 50]), stage("auto")) == 90
    assert packing_capacity(model, padded([60, 90, 50]), stage("auto")) is None
    with pytest.raises(ValueError, match="stage 'sft': packing=on, but model_type 'llava'"):
        check_packing(fake_model(model_type="llava"), stage("on"))
    check_packing(fake_model(), stage("auto"))
    assert packing_capacity(fake_model(), padded([40, 90]), stage("auto")) is None
    # Flash-attention: always packed, into one row (transformers' varlen path needs batch 1).
    monkeypatch.setattr(packed, "attention_implementation", lambda model: "flash_attention_2")
    monkeypatch.setattr("geovlm.sft.attention_implementation", lambda model: "flash_attention_2")
    assert packing_capacity(model, padded([60, 90, 50]), stage("auto")) == stage("auto").max_length
    assert pack_for_model(model, batch, max(sequence_lengths(batch)), PAD_ID)[
        "input_ids"
    ].shape == (1, sum(sequence_lengths(batch)))


def test_sft_stage_packed_equals_padded(tmp_path, monkeypatch):
    """The whole SFT stage (accumulation window, loss normalisation, optimizer) on packed
    micro-batches gives the padded run's losses, token counts and weights."""
    from safetensors.torch import load_file

    import geovlm.sft
    from geovlm.train import run
    from tests.test_train import config_for, records

    packed_rows = []

    def spy(model, batch, capacity, pad_id):
        packed = pack_for_model(model, batch, capacity, pad_id)
        packed_rows.append(packed["input_ids"].shape[0])
        return packed

    monkeypatch.setattr(geovlm.sft, "pack_for_model", spy)
    common = ("stages.sft.steps=2", "stages.sft.batch_size=4", "stages.sft.grad_accum=2",
              "stages.sft.save_every=0", "stages.sft.lr=0.01", "stages.sft.warmup_ratio=0.0")
    runs = {}
    for mode in ("off", "on"):
        config = config_for(tmp_path, f"packing-{mode}", *common, f"stages.sft.packing={mode}")
        run(config)
        final = config.run_dir / "stages" / "0-sft" / "final" / "model.safetensors"
        runs[mode] = records(config, "sft"), load_file(final)
    # 2 steps x 2 micro-batches of 4 samples, each packed into fewer rows.
    assert len(packed_rows) == 4 and max(packed_rows) < 4
    (padded_log, padded_final), (packed_log, packed_final) = runs["off"], runs["on"]
    assert [r["tokens"] for r in packed_log] == [r["tokens"] for r in padded_log]
    for a, b in zip(packed_log, padded_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert set(packed_final) == set(padded_final)
    for name, weight in padded_final.items():
        # Adam divides by sqrt(v): float-rounding differences of near-zero gradients grow to
        # ~1e-5 after two steps of lr 0.01 (updates are ~1e-2).
        torch.testing.assert_close(packed_final[name], weight, rtol=1e-4, atol=1e-4)
