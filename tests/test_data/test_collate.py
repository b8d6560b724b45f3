"""geovlm.data.collate: chat messages, SFT labels, padded prompts, row selection.

Oracles: the processor's own batched call (``processor(text=..., images=..., padding=True)``
with the matching padding side), Qwen2.5-VL's released chat template as TRL ships it, the
tokenizer on the bare response, and qwen-vl-utils' ``smart_resize`` for the image grids.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
import trl
from qwen_vl_utils import smart_resize

from geovlm.data.collate import (
    DEFAULT_SYSTEM_PROMPT,
    build_messages,
    collate_prompts,
    collate_sft,
    images_per_row,
    pixel_budget,
    select_rows,
)
from tests.test_model import make_sample, random_image, tiny_policy


@pytest.fixture(scope="module")
def processor():
    return tiny_policy()[1]


@pytest.fixture
def samples():
    rng = np.random.default_rng()
    return [
        make_sample(rng, 0),
        make_sample(rng, 1, ((112, 112), (140, 84))),
        make_sample(rng, 2, ((84, 196),)),
    ]


def _processor_batch(processor, samples, texts, side):
    """The established path: one batched processor call on qwen-vl-utils-free PIL images."""
    images = [image for sample in samples for image in sample.load_images()]
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        return processor(text=texts, images=images, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = old


def _prompt_texts(processor, samples):
    return [
        processor.apply_chat_template(build_messages(s), tokenize=False, add_generation_prompt=True)
        for s in samples
    ]


def test_build_messages(samples):
    messages = build_messages(samples[1])
    assert messages[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    user = messages[1]
    assert user["role"] == "user"
    assert [item["type"] for item in user["content"]] == ["image", "image", "text"]
    assert user["content"][1]["image"].size == (140, 84)
    assert user["content"][2]["text"] == samples[1].prompt
    assert [m["role"] for m in build_messages(samples[0], system_prompt=None)] == ["user"]
    assert "<think>" in DEFAULT_SYSTEM_PROMPT and "<answer>" in DEFAULT_SYSTEM_PROMPT


def test_sft_batch_matches_the_processors_own_batching(processor, samples):
    batch = collate_sft(samples, processor, max_length=1024)
    texts = [
        t + s.response + "<|im_end|>"
        for t, s in zip(_prompt_texts(processor, samples), samples, strict=True)
    ]
    expected = _processor_batch(processor, samples, texts, side="right")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        torch.testing.assert_close(batch[key], expected[key], msg=key)
    if "mm_token_type_ids" in expected:
        torch.testing.assert_close(batch["mm_token_type_ids"], expected["mm_token_type_ids"])


def test_sft_text_is_the_qwen_conversation(processor, samples):
    """The SFT sequence is Qwen's rendering of the full conversation, minus the final newline."""
    template_path = Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja"
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        template_path.read_text()
    )
    batch = collate_sft(samples, processor, max_length=1024)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, sample in enumerate(samples):
        messages = build_messages(sample) + [{"role": "assistant", "content": sample.response}]
        expected = template.render(messages=messages, add_generation_prompt=False)
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        # Collapse each image's run of placeholder tokens back to the template's single one.
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[1:] = ~((ids[1:] == image_id) & (ids[:-1] == image_id))
        text = processor.tokenizer.decode(ids[keep])
        assert text + "\n" == expected


def test_labels_are_exactly_the_response_tokens(processor, samples):
    batch = collate_sft(samples, processor, max_length=1024)
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        labels = batch["labels"][row]
        response = tokenizer(sample.response + "<|im_end|>", add_special_tokens=False)["input_ids"]
        labelled = torch.nonzero(labels != -100).squeeze(1)
        assert labels[labelled].tolist() == response
        # Contiguous and ending at the last real token (right padding after it).
        length = int(batch["attention_mask"][row].sum())
        assert labelled.tolist() == list(range(length - len(response), length))
        assert batch["input_ids"][row, labelled].tolist() == response
        assert tokenizer.decode(labels[labelled]) == sample.response + "<|im_end|>"
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()


def test_image_grids_follow_smart_resize(processor, samples):
    batch = collate_sft(samples, processor, max_length=1024)
    min_pixels, max_pixels = pixel_budget(processor)
    sizes = [image.size for s in samples for image in s.load_images()]
    for (width, height), grid in zip(sizes, batch["image_grid_thw"], strict=True):
        h, w = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        assert grid.tolist() == [1, h // 14, w // 14]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tokens = (batch["input_ids"] == image_id).sum().item()
    assert tokens == int(batch["image_grid_thw"].prod(dim=1).sum()) // 4
    assert batch["pixel_values"].shape == (
        int(batch["image_grid_thw"].prod(dim=1).sum()),
        3 * 2 * 14 * 14,
    )
    assert images_per_row(batch["input_ids"], image_id).tolist() == [1, 2, 1]


def test_large_images_are_capped_by_the_pixel_budget(processor):
    rng = np.random.default_rng()
    sample = make_sample(rng, 0, ((600, 400),))
    batch = collate_prompts([sample], processor)
    _, max_pixels = pixel_budget(processor)
    t, h, w = batch["image_grid_thw"][0].tolist()
    assert t == 1 and h * w * 14 * 14 <= max_pixels


def test_prompts_are_left_padded_generation_prompts(processor, samples):
    batch = collate_prompts(samples, processor)
    expected = _processor_batch(processor, samples, _prompt_texts(processor, samples), side="left")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        torch.testing.assert_close(batch[key], expected[key], msg=key)
    assert "labels" not in batch
    assert (batch["attention_mask"][:, -1] == 1).all()
    suffix = processor.tokenizer("<|im_start|>assistant\n")["input_ids"]
    assert (batch["input_ids"][:, -len(suffix) :] == torch.tensor(suffix)).all()


def test_over_long_sample_is_an_error_naming_it(processor, samples):
    with pytest.raises(ValueError, match=r"sample s1 .* over max_length=60"):
        collate_sft(samples[1:2], processor, max_length=60)


def test_missing_image_is_an_error_naming_the_sample(processor, samples, tmp_path):
    samples[0].images = [tmp_path / "gone.png"]
    with pytest.raises(FileNotFoundError, match="sample s0 .*gone.png"):
        collate_prompts(samples, processor)


def test_image_paths_and_text_only_samples(processor, samples, tmp_path):
    path = tmp_path / "tile.png"
    random_image(np.random.default_rng(), 112, 112).save(path)
    on_disk = make_sample(np.random.default_rng(), 5)
    on_disk.images = [str(path)]
    text_only = make_sample(np.random.default_rng(), 6)
    text_only.images = []
    batch = collate_sft([text_only, on_disk, samples[1]], processor, max_length=1024)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert images_per_row(batch["input_ids"], image_id).tolist() == [0, 1, 2]
    assert batch["image_grid_thw"].shape[0] == 3


def test_select_rows_equals_collating_the_repeated_samples(processor, samples):
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    batch = collate_prompts(samples, processor)
    rows = torch.tensor([2, 0, 0, 1, 1, 1, 2])
    selected = select_rows(batch, rows, image_id)
    expected = collate_prompts([samples[i] for i in rows.tolist()], processor)
    assert selected.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(selected[key], value, msg=key)


def test_select_rows_rejects_inconsistent_batches(processor, samples):
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    batch = collate_prompts(samples, processor)
    batch["image_grid_thw"] = batch["image_grid_thw"][:2]
    with pytest.raises(ValueError, match="2 images in image_grid_thw but 4 in input_ids"):
        select_rows(batch, [0], image_id)


def test_empty_inputs_are_errors(processor):
    with pytest.raises(ValueError, match="at least one sample"):
        collate_sft([], processor, max_length=10)
    with pytest.raises(ValueError, match="at least one sample"):
        collate_prompts([], processor)
