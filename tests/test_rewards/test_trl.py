"""``geovlm.rewards.trl``: the rewards as TRL reward functions.

The functions must give ``score``'s components on string and conversational inputs, read the
``target`` column TRL passes through, and run inside TRL's own ``GRPOTrainer`` (a tiny Qwen2
built offline, one optimiser step, conversational prompts through a chat template).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from geovlm.data.synthetic import generate_scenes, samples_from_scene
from geovlm.rewards import RewardOptions, score
from geovlm.rewards import trl as geo_trl

OPTIONS = RewardOptions(use_embeddings=False)
SAMPLES = [s for scene in generate_scenes(4, 2) for s in samples_from_scene(scene)]


def _completions(samples):
    """Right, wrong-formatted and empty completions per sample."""
    out = []
    for s in samples:
        out += [s.response, f"<answer>{s.target.answer}</answer>", "", f"<think></think>{s.prompt}"]
    return out


def test_targets_round_trip_through_json():
    for sample in SAMPLES:
        text = geo_trl.target_to_json(sample.target)
        back = geo_trl.target_from_json(text)
        assert geo_trl.target_from_json(text) is back  # one object per distinct string
        for read in (back, geo_trl.target_from_json(json.loads(text))):
            for field in dataclasses.fields(sample.target):
                want, got = getattr(sample.target, field.name), getattr(read, field.name)
                if isinstance(want, np.ndarray):
                    np.testing.assert_array_equal(got, want)
                    assert got.dtype == np.float64
                elif field.name == "meta":  # free-form: JSON's types (tuples become lists)
                    assert got == json.loads(json.dumps(want))
                else:
                    assert got == want and type(got) is type(want), field.name


@pytest.mark.parametrize("conversational", [False, True])
def test_reward_funcs_give_score_components(conversational):
    fmt, acc = geo_trl.reward_funcs(OPTIONS)
    assert (fmt.__name__, acc.__name__) == ("geovlm_format", "geovlm_accuracy")
    samples = [s for s in SAMPLES for _ in range(4)]
    completions = _completions(SAMPLES)
    prompts = [s.prompt for s in samples]
    targets = [geo_trl.target_to_json(s.target) for s in samples]
    if conversational:
        prompts = [[{"role": "system", "content": "Answer."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
                   for p in prompts]
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=None,
                  target=targets, trainer_state=None, log_metric=print)
    expected = score([s.task for s in samples], _completions(SAMPLES),
                     [s.target for s in samples], options=OPTIONS,
                     prompts=[s.prompt for s in samples])
    np.testing.assert_array_equal(fmt(**kwargs), expected.components["format"])
    np.testing.assert_array_equal(acc(**kwargs), expected.components["accuracy"])
    assert expected.components["format"].sum() == len(SAMPLES)  # the responses, and only they


def test_unusable_inputs():
    fmt, acc = geo_trl.reward_funcs(OPTIONS)
    target = geo_trl.target_to_json(SAMPLES[0].target)
    odd = [None, [{"role": "assistant", "content": None}], 3, {"content": SAMPLES[0].response}]
    assert fmt(prompts=None, completions=odd, target=[target] * 4) == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="'target' dataset column"):
        acc(prompts=None, completions=["x"])
    with pytest.raises(ValueError, match="row 1: target has no 'task'"):
        acc(prompts=None, completions=["x", "y"], target=[target, '{"answer": "a"}'])
    with pytest.raises(ValueError, match="row 0: target is not JSON"):
        acc(prompts=None, completions=["x"], target=["{"])
    with pytest.raises(ValueError, match="unknown fields"):
        acc(prompts=None, completions=["x"], target=['{"task": "vqa", "answer": "a", '
                                                     '"image_size": [1, 1], "labl": "a"}'])


# --------------------------------------------------------------------------- inside GRPOTrainer

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}"
)


def _tokenizer(words):
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(dict.fromkeys(words))})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def test_reward_funcs_inside_trl_grpo_trainer(tmp_path):
    import torch

    samples = [s for s in SAMPLES if s.task in ("scene_cls", "vqa", "counting", "change_det")]
    words = TAGS + [w for s in samples for w in f"{s.prompt} {s.target.answer}".split()]
    tokenizer = _tokenizer(words + ["0", "1", "2", "3", "yes", "no"])
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    path = tmp_path / "tiny-qwen2"
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)

    calls = []
    fmt, acc = geo_trl.reward_funcs(OPTIONS)

    def recorded(fn):
        def wrapper(**kwargs):
            out = fn(**kwargs)
            calls.append((fn.__name__, kwargs, out))
            return out

        wrapper.__name__ = fn.__name__
        return wrapper

    dataset = datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": s.prompt}] for s in samples],
        "target": [geo_trl.target_to_json(s.target) for s in samples],
    })
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=1, learning_rate=1e-3, logging_steps=1,
        report_to=[], use_cpu=True, seed=3, save_strategy="no", disable_tqdm=True, bf16=False,
        reward_weights=[1.0, 1.0],
    )
    trainer = trl.GRPOTrainer(model=str(path), reward_funcs=[recorded(fmt), recorded(acc)],
                              args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

    assert [c[0] for c in calls] == ["geovlm_format", "geovlm_accuracy"]
    _, kwargs, fmt_out = calls[0]
    completions = kwargs["completions"]
    assert isinstance(completions[0], list) and completions[0][0]["role"] == "assistant"
    targets = [geo_trl.target_from_json(t) for t in kwargs["target"]]
    texts = [geo_trl.completion_text(c) for c in completions]
    questions = [geo_trl.prompt_text(p) for p in kwargs["prompts"]]
    expected = score([t.task for t in targets], texts, targets, options=OPTIONS, prompts=questions)
    assert fmt_out == expected.components["format"].tolist()
    assert calls[1][2] == expected.components["accuracy"].tolist()
    logged = next(h for h in trainer.state.log_history if "rewards/geovlm_format/mean" in h)
    assert logged["rewards/geovlm_accuracy/mean"] == pytest.approx(
        expected.components["accuracy"].mean(), abs=1e-6
    )
