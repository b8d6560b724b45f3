"""geovlm.model: the tiny Qwen2.5-VL and checkpoint loading, one code path.

Oracles: float64 cross-entropy and matmul recomputed here from the model's own tensors, HF's
un-checkpointed forward for gradient checkpointing, and the saved/reloaded model for I/O.
Also holds the tiny-world helpers the collate and rollout tests import.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from geovlm.data.collate import collate_sft, pixel_budget
from geovlm.data.schema import Sample, Target
from geovlm.model import (
    TINY_DEFAULTS,
    apply_kernel_patches,
    build_policy,
    default_attn_implementation,
    default_dtype,
    forward_hidden,
    forward_logits,
    is_checkpointing,
    lm_head_weight,
    load_reference_model,
    save_pretrained,
)
from tests.test_tokenizer import make_corpus

# Small enough for fast CPU tests, still every architectural piece of the default tiny model.
TEST_SIZES = {"vocab_size": 500, "num_hidden_layers": 2, "intermediate_size": 256}


def tiny_policy(seed: int = 0, **kwargs):
    corpus = make_corpus(np.random.default_rng(seed), 600)
    return build_policy(tokenizer_corpus=corpus, tiny=dict(TEST_SIZES), seed=seed, **kwargs)


def random_image(rng: np.random.Generator, width: int = 112, height: int = 112) -> Image.Image:
    """Blocky coloured noise, a stand-in for an aerial tile."""
    blocks = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    big = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    pad = ((0, height - big.shape[0]), (0, width - big.shape[1]), (0, 0))
    return Image.fromarray(np.pad(big, pad, mode="edge"))


def make_sample(
    rng: np.random.Generator, index: int, sizes: tuple[tuple[int, int], ...] = ((112, 112),)
) -> Sample:
    """A scene-classification sample, or change detection when given two image sizes."""
    images = [random_image(rng, w, h) for w, h in sizes]
    words = " ".join(rng.choice(["ship", "tank", "field", "river", "road"], size=3))
    if len(images) == 2:
        task, prompt, answer = "change_det", f"Did anything change? {words}", "yes"
    else:
        task, prompt, answer = "scene_cls", f"Classify the scene. {words}", "farmland"
    target = Target(task=task, answer=answer, image_size=sizes[0], label=answer)
    return Sample(
        id=f"s{index}", task=task, images=images, prompt=prompt, target=target, think=words
    )


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


@pytest.fixture(scope="module")
def batch(policy):
    _, processor = policy
    rng = np.random.default_rng()
    samples = [
        make_sample(rng, 0),
        make_sample(rng, 1, ((112, 112), (140, 84))),
        make_sample(rng, 2, ((84, 112),)),
    ]
    return collate_sft(samples, processor, max_length=512)


def test_tiny_model_shape(policy):
    model, processor = policy
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessor)
    text, vision = model.config.text_config, model.config.vision_config
    assert text.vocab_size == len(processor.tokenizer)
    assert text.hidden_size == TINY_DEFAULTS["hidden_size"]
    assert text.num_hidden_layers == TEST_SIZES["num_hidden_layers"]
    assert (vision.depth, vision.patch_size, vision.spatial_merge_size) == (2, 14, 2)
    assert vision.out_hidden_size == text.hidden_size
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.dtype == torch.float32 and model.training
    assert model.config._attn_implementation == "sdpa"


def test_forward_backward_with_one_and_two_image_samples(policy, batch):
    model, _ = policy
    model.zero_grad()
    out = model(**batch)
    # Oracle: float64 next-token cross-entropy over the labelled positions.
    logits = out.logits.detach().double()[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for name in (
        "model.visual.patch_embed.proj.weight",
        "model.language_model.embed_tokens.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert torch.isfinite(lm_head_weight(model).grad).all()
    model.zero_grad()


def test_forward_hidden_times_lm_head_is_the_logits(policy, batch):
    model, _ = policy
    with torch.no_grad():
        hidden = forward_hidden(model, batch)
        logits = forward_logits(model, batch)
        last = forward_logits(model, batch, logits_to_keep=5)
    weight = lm_head_weight(model)
    assert hidden.shape == (*batch["input_ids"].shape, model.config.text_config.hidden_size)
    assert weight.shape == (model.config.text_config.vocab_size, hidden.shape[-1])
    expected = hidden.double() @ weight.double().T
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, logits[:, -5:], rtol=1e-5, atol=1e-5)


def _hidden_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    hidden = forward_hidden(model, batch)
    mask = batch["attention_mask"][..., None]
    (hidden.pow(2) * mask).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_matches_plain_backward(batch):
    plain, _ = tiny_policy(seed=3)
    checkpointed, _ = tiny_policy(seed=3, gradient_checkpointing=True)
    assert is_checkpointing(checkpointed) and not is_checkpointing(plain)
    expected = _hidden_grads(plain, batch)
    got = _hidden_grads(checkpointed, batch)
    assert expected.keys() == got.keys() and len(got) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_freeze_vision(batch):
    model, _ = tiny_policy(freeze_vision=True)
    grads = _hidden_grads(model, batch)
    visual = [n for n, _ in model.named_parameters() if ".visual." in f".{n}"]
    assert visual and not any(p.requires_grad for n, p in model.named_parameters() if n in visual)
    assert not set(visual) & set(grads)
    assert any("language_model" in n for n in grads)


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first, _ = tiny_policy(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _ = tiny_policy(seed=5)
    third, _ = tiny_policy(seed=6)
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name
    pairs = zip(first.parameters(), third.parameters(), strict=True)
    assert not all(torch.equal(a, c) for a, c in pairs)


def test_save_then_load_by_path_is_the_same_model(policy, batch, tmp_path):
    model, processor = policy
    save_pretrained(model, processor, tmp_path / "ckpt")
    loaded, loaded_processor = build_policy(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    assert loaded.config._attn_implementation == "sdpa" and loaded.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded, batch), forward_logits(model, batch))
    text = "<|im_start|>user\n<think>3 ships</think><|im_end|>"
    assert loaded_processor.tokenizer.encode(text) == processor.tokenizer.encode(text)
    assert loaded_processor.chat_template == processor.chat_template


def _save_tiny_qwen2_vl(directory, processor) -> None:
    """A Qwen2-VL (not 2.5) checkpoint with the test tokenizer, as a real one would be laid out."""
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory)
    size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=tokenizer.chat_template,
    ).save_pretrained(directory)


def test_loads_a_qwen2_vl_checkpoint_through_the_same_path(policy, tmp_path):
    _, processor = policy
    _save_tiny_qwen2_vl(tmp_path, processor)
    model, loaded_processor = build_policy(tmp_path, gradient_checkpointing=True)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert isinstance(loaded_processor, Qwen2VLProcessor)
    rng = np.random.default_rng()
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (112, 140)))]
    batch = collate_sft(samples, loaded_processor, max_length=512)
    hidden = forward_hidden(model, batch)
    logits = forward_logits(model, batch)
    torch.testing.assert_close(
        logits.double(), hidden.double() @ lm_head_weight(model).double().T, rtol=1e-5, atol=1e-5
    )
    hidden.sum().backward()
    assert torch.isfinite(model.model.visual.patch_embed.proj.weight.grad).all()


def test_reference_model_is_a_frozen_independent_copy(policy, batch, tmp_path):
    model, processor = policy
    reference = load_reference_model(model)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        before = forward_logits(model, batch)
        torch.testing.assert_close(forward_logits(reference, batch), before)
        lm_head_weight(model).add_(1.0)
        try:
            torch.testing.assert_close(forward_logits(reference, batch), before)
        finally:
            lm_head_weight(model).sub_(1.0)
    save_pretrained(model, processor, tmp_path)
    from_disk = load_reference_model(tmp_path)
    assert not from_disk.training and not any(p.requires_grad for p in from_disk.parameters())
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(from_disk, batch), before)


def test_dtype_and_attention_defaults(monkeypatch):
    assert default_dtype("cuda") == torch.bfloat16 and default_dtype("cpu") == torch.float32
    assert default_attn_implementation("cpu") == "sdpa"
    import geovlm.model as model_module

    real_find_spec = model_module.importlib.util.find_spec
    monkeypatch.setattr(
        model_module.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a),
    )
    assert default_attn_implementation("cuda") == "flash_attention_2"
    assert default_attn_implementation("cpu") == "sdpa"


def test_pixel_budget_override():
    _, processor = tiny_policy(min_pixels=28 * 28, max_pixels=112 * 112)
    assert pixel_budget(processor) == (28 * 28, 112 * 112)
    assert processor.video_processor.size["longest_edge"] == 112 * 112


def test_explicit_dtype():
    model, _ = tiny_policy(dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny-model settings"):
        build_policy(tokenizer_corpus=["a b"], tiny={"x": 1})
    with pytest.raises(ValueError, match="needs tokenizer_corpus"):
        build_policy()
    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA"):
        tiny_policy(attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="unknown attn_implementation"):
        tiny_policy(attn_implementation="fast")
    with pytest.raises(ValueError, match="unknown dtype"):
        tiny_policy(dtype="float13")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_policy(tmp_path / "missing")
    with pytest.raises(ValueError, match="only apply when building"):
        build_policy(tmp_path, tokenizer_corpus=["a"])
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        build_policy(tmp_path)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_policy(tokenizer_corpus=["a b"], tiny={"hidden_size": 100})


def test_kernel_patches_are_a_logged_noop_off_cuda(policy, caplog):
    model, _ = policy
    with caplog.at_level(logging.INFO, logger="geovlm.model"):
        assert apply_kernel_patches(model) is False
        assert apply_kernel_patches(model, liger=False) is False
    assert "need CUDA" in caplog.text and "disabled by the caller" in caplog.text


def test_forward_hidden_through_a_data_parallel_wrapper_is_the_same(policy, batch):
    class Wrapper(torch.nn.Module):
        """Stands in for DDP / DeepSpeed: a ``module`` attribute and a pass-through forward."""

        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    model, _ = policy
    with torch.no_grad():
        plain = forward_hidden(model, batch)
        wrapped = forward_hidden(Wrapper(model), batch)
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)
    assert lm_head_weight(Wrapper(model)) is lm_head_weight(model)


def test_number_tokens_reach_the_tiny_models_vocabulary(policy):
    plain, _ = policy
    corpus = make_corpus(np.random.default_rng(0), 600)
    numbered, processor = build_policy(
        tokenizer_corpus=corpus, tiny=dict(TEST_SIZES, number_tokens=128), seed=0
    )
    tokenizer = processor.tokenizer
    assert numbered.config.text_config.vocab_size == len(tokenizer)
    assert len(tokenizer) > plain.config.text_config.vocab_size
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("[17, 101]")]
    assert pieces == ["[", "17", ",", " ", "101", "]"]
