"""geovlm.tokenizer: byte-level BPE with Qwen2.5-VL's special tokens and chat template.

Oracles: the input text itself (lossless round trips), and Qwen2.5-VL's released chat template
as TRL ships it (``trl/chat_templates/qwen2_5_vl.jinja``) rendered by jinja2.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import jinja2
import numpy as np
import pytest
import trl
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from geovlm.tokenizer import FORMAT_TOKENS, SPECIAL_TOKENS, build_tokenizer

WORDS = (
    "ship plane storage tank vehicle building farmland forest water bare land urban red blue "
    "white small large near left right of the a is are there how many moored parked"
).split()


def make_corpus(rng: np.random.Generator, n: int) -> list[str]:
    """Short EO-like instructions and answers with numbers and boxes, as the embedded world has."""
    texts = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS, size=rng.integers(3, 12)))
        box = ", ".join(str(v) for v in rng.integers(0, 1000, size=4))
        texts.append(f"<think>{words}</think><answer>{words} [{box}]</answer>")
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(make_corpus(np.random.default_rng(), 3000), vocab_size=600)


def test_special_and_format_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in SPECIAL_TOKENS + FORMAT_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(ids)
    # In running text too, next to other characters.
    text = "x<think>y</think>z<answer>[1, 2]</answer><|im_end|>"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<|im_end|>"):
        assert tokens.count(tag) == 1


def test_qwen_eos_and_pad_conventions(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.unk_token is None
    assert tokenizer.encode("abc") == tokenizer.encode("abc", add_special_tokens=False)


def test_skip_special_tokens_keeps_format_tags(tokenizer):
    text = "<|im_start|>assistant\n<think>two ships</think><answer>2</answer><|im_end|>"
    decoded = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert decoded == "assistant\n<think>two ships</think><answer>2</answer>"


def test_digits_are_split_one_token_each(tokenizer):
    rng = np.random.default_rng()
    number = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(5, 12))))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(number))
    assert tokens == list(number)
    # The same digits tokenize alike whatever surrounds them.
    box = tokenizer.convert_ids_to_tokens(tokenizer.encode(f"[{number}, 7]"))
    assert box[1 : 1 + len(number)] == list(number)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_round_trip_unseen_scripts_and_bytes(tokenizer):
    text = "Überschwemmung 洪水 😀 \t tabs\r\nnew line  two  spaces é"
    assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


def _qwen_template() -> jinja2.Template:
    path = Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja"
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(path.read_text())


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_qwen25vl(tokenizer, add_generation_prompt):
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]}],
        [
            {"role": "system", "content": "Think first."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "before.png"},
                    {"type": "image", "image": "after.png"},
                    {"type": "text", "text": "What changed?"},
                ],
            },
            {"role": "assistant", "content": "<think>a</think><answer>b</answer>"},
        ],
    ]
    for messages in conversations:
        ours = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        expected = _qwen_template().render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )
        assert ours == expected


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\n<think>12 ships</think><answer>[3, 4, 5, 6]</answer><|im_end|>"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    assert loaded.chat_template == tokenizer.chat_template


def test_training_is_deterministic():
    corpus = make_corpus(np.random.default_rng(), 500)
    first = build_tokenizer(corpus, vocab_size=400)
    second = build_tokenizer(corpus, vocab_size=400)
    assert first.get_vocab() == second.get_vocab()


def test_vocab_size_bounds_the_vocabulary():
    corpus = make_corpus(np.random.default_rng(), 2000)
    small = build_tokenizer(corpus, vocab_size=300)
    assert len(small) <= 300 + len(FORMAT_TOKENS)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="non-empty corpus"):
        build_tokenizer(["", ""])
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        build_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(TypeError, match="corpus must hold strings"):
        build_tokenizer(["text", 3])


def test_number_tokens_make_every_integer_below_the_bound_one_token():
    rng = np.random.default_rng()
    corpus = make_corpus(rng, 500)
    numbered = build_tokenizer(corpus, vocab_size=400, number_tokens=256)
    plain = build_tokenizer(corpus, vocab_size=400)
    assert len(numbered) - len(plain) == 256 - 10  # the ten digits are byte symbols already
    values = rng.integers(0, 256, size=4)
    text = f"<answer>[{', '.join(str(v) for v in values)}]</answer>"
    tokens = numbered.convert_ids_to_tokens(numbered.encode(text))
    assert [t for t in tokens if t.isdigit()] == [str(v) for v in values]
    # Every integer is one token, whatever surrounds it; larger numbers split and round-trip.
    for n in (0, 9, 10, 99, 100, 255):
        assert len(numbered.encode(str(n))) == 1
        assert numbered.convert_ids_to_tokens(numbered.encode(f"x{n},"))[1] == str(n)
    for text in ("256", "1050", "2026-12-05", "007", "[3, 999, 12345]"):
        ids = numbered.encode(text)
        assert numbered.decode(ids) == text
        assert all(len(numbered.decode([i])) <= 3 for i in ids)


def test_number_tokens_survive_save_and_reload(tmp_path):
    tokenizer = build_tokenizer(make_corpus(np.random.default_rng(), 300), 400, number_tokens=128)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<think>3 ships</think><answer>[17, 101, 127, 128]</answer>"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    with pytest.raises(ValueError, match="number_tokens must be >= 0"):
        build_tokenizer(["some text"], vocab_size=400, number_tokens=-1)
