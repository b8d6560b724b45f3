"""A small Qwen2.5-VL-compatible tokenizer trained offline on a text corpus.

The tiny model of the embedded default needs a tokenizer whose vocabulary fits the corpus (a
152k-token Qwen vocabulary would dwarf a 128-wide model) but which behaves like Qwen2.5-VL's:

* byte-level BPE, so any text encodes and decodes losslessly (no unknown token);
* Qwen2's pre-tokenizer split, which isolates every digit, so ``123`` is always ``1 2 3`` and
  box coordinates tokenize regularly whatever numbers the corpus happened to contain; or, with
  ``number_tokens``, one token per integer below it, as location-token models do (Pix2Seq,
  Kosmos-2, Florence-2, PaliGemma): a small language model trained from scratch does not learn
  the digit arithmetic a coordinate spelt digit by digit needs (``benchmarks/RESULTS.md``, "A
  fifth look");
* Qwen2.5-VL's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``,
  ``<|vision_start|>``, ``<|image_pad|>``, ...) as single ids, ``<|im_end|>`` as EOS and
  ``<|endoftext|>`` as padding, exactly as the real tokenizer configures them;
* ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` as single, *non-special* tokens, so that
  decoding with ``skip_special_tokens=True`` keeps them for the reward parsers;
* Qwen2.5-VL's chat template, so ``processor.apply_chat_template`` accepts image content items.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

# Special tokens of Qwen2.5-VL's tokenizer (tokenizer_config.json of the released checkpoints).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# GeoVLM-R1's output format tags: single ids, but ordinary text when decoding.
FORMAT_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2's pre-tokenization pattern: contractions, letter runs with one optional leading
# non-letter, single digits, punctuation runs, newlines and whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL / Qwen2.5-VL chat template (byte-identical in both released checkpoints): a default
# system turn, images and videos as vision placeholders, optional "Picture N:" ids.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Text every conversation carries (the chat template's turns and default system prompt), added
# to the training corpus with this weight so that it compresses like the corpus's own phrases.
CHAT_SCAFFOLD: tuple[str, ...] = (
    "system\nYou are a helpful assistant.",
    "user\n",
    "assistant\n",
    "Picture 1: Picture 2: ",
)
SCAFFOLD_WEIGHT = 64


def _backend(vocab_size: int) -> tuple[Tokenizer, BpeTrainer]:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def build_tokenizer(
    corpus: Iterable[str], vocab_size: int = 2000, number_tokens: int = 0
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` with Qwen2.5-VL's tokens and chat template.

    ``vocab_size`` counts the 256 byte symbols and the special tokens; the 4 format tokens come on
    top, and so do ``number_tokens`` single tokens for the integers ``0 .. number_tokens - 1``
    (matched before the digit split, longest first: ``[34, 107]`` is ``[``, ``34``, ``,``, `` ``,
    ``107``, ``]``; longer numbers still split into such pieces and round-trip). 0 keeps Qwen's
    one token per digit. The chat template's fixed text is added to the corpus; the corpus should
    hold the texts the model will read and write (prompts, system prompt, responses). Training is
    deterministic for a given corpus (order included).
    """
    n_reserved = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= n_reserved:
        raise ValueError(
            f"vocab_size must exceed {n_reserved} (bytes + special tokens), got {vocab_size}"
        )
    if number_tokens < 0:
        raise ValueError(f"number_tokens must be >= 0, got {number_tokens}")
    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("build_tokenizer needs a non-empty corpus of non-empty strings")
    if not all(isinstance(text, str) for text in texts):
        bad = next(type(text).__name__ for text in texts if not isinstance(text, str))
        raise TypeError(f"corpus must hold strings, found {bad}")

    backend, trainer = _backend(vocab_size)
    texts.extend(text for text in CHAT_SCAFFOLD for _ in range(SCAFFOLD_WEIGHT))
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in FORMAT_TOKENS])
    if number_tokens:
        backend.add_tokens([
            AddedToken(str(n), special=False, normalized=False) for n in range(number_tokens)
        ])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    # Registering the rest as special makes skip_special_tokens drop them, as Qwen's does.
    others = [token for token in SPECIAL_TOKENS if token not in ("<|im_end|>", "<|endoftext|>")]
    tokenizer.add_special_tokens({"additional_special_tokens": others})
    tokenizer.chat_template = QWEN25VL_CHAT_TEMPLATE
    return tokenizer
