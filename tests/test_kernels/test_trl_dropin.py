"""TRL drop-in: a tiny Qwen2 causal LM trained for a few GRPO steps with TRL's own loss and with the
fused loss (``FusedGRPOTrainer``, or ``enable_fused_loss`` on a built trainer) logs the same losses
and ends with the same weights (fp32 and plain SGD, so the weights follow the gradients linearly),
against the TRL version installed (the lock pins 1.16, ``SUPPORTED_TRL``).

The model and tokenizer are built offline from a config; generation, rewards and advantages are
TRL's in both runs, so any difference comes from the loss. The fused run takes the last hidden
state through the linear kernel and never asks the LM head for more than one position (the
logits path, for heads the linear kernel cannot take, is run by forcing it). On CPU the kernels
run through the interpreter when it is active, else the spec path.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from .conftest import INTERPRETED

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from geovlm.kernels import trl as fused_trl  # noqa: E402

WORDS = ["field", "river", "ship", "tank", "road", "farm", "city", "forest", "yes", "no"]


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",
    )


def _model_dir(tmp_path, tokenizer):
    """A freshly initialised tiny Qwen2 saved to disk (TRL builds the KL reference model from
    the policy's path)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False,
    )
    path = tmp_path / "tiny-qwen2"
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _reward(completions, **kwargs):
    """Deterministic and varied across a group: the share of ship/tank words."""
    return [sum(w in ("ship", "tank") for w in c.split()) / max(len(c.split()), 1)
            for c in completions]


def _train(tmp_path, fused: str | None, on_built=None, **options):
    tokenizer = _tokenizer()
    prompts = ["field river ship", "tank road farm", "city forest yes", "no ship tank"]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / (fused or "trl")), per_device_train_batch_size=4,
        num_generations=4, gradient_accumulation_steps=2, max_completion_length=6,
        max_steps=3, learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[], use_cpu=True,
        seed=7, save_strategy="no", temperature=0.9, disable_tqdm=True, bf16=False, **options,
    )
    backend = "triton" if INTERPRETED else "torch"
    cls = fused_trl.FusedGRPOTrainer if fused == "subclass" else trl.GRPOTrainer
    kwargs = {"backend": backend} if fused == "subclass" else {}
    trainer = cls(model=_model_dir(tmp_path, tokenizer), reward_funcs=_reward, args=args,
                  train_dataset=datasets.Dataset.from_dict({"prompt": prompts * 4}),
                  processing_class=tokenizer, **kwargs)
    if fused == "enable":
        fused_trl.enable_fused_loss(trainer, backend=backend)
    if on_built is not None:
        on_built(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, trainer.model.state_dict()


@pytest.mark.parametrize(
    "fused,path,options",
    [
        ("subclass", "hidden", dict(loss_type="dapo", beta=0.04, epsilon_high=0.28,
                                    steps_per_generation=4)),
        ("enable", "hidden", dict(loss_type="grpo", importance_sampling_level="sequence",
                                  num_iterations=2, use_bias_correction_kl=True, beta=0.02)),
        ("subclass", "logits", dict(loss_type="bnpo", beta=0.04, delta=1.5)),
    ],
    ids=["dapo-kl-off-policy", "grpo-sequence-multi-iteration", "bnpo-delta-logits-path"],
)
def test_fused_trainer_matches_trl(tmp_path, monkeypatch, fused, path, options):
    calls = {"linear_selective_log_softmax": 0, "fused_log_probs": 0}
    for name in calls:
        original = getattr(fused_trl, name)

        def counted(*a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(*a, **k)

        monkeypatch.setattr(fused_trl, name, counted)
    if path == "logits":  # as for a soft-capped or sharded head
        monkeypatch.setattr(fused_trl, "plain_lm_head", lambda model: None)
    # Positions the LM head is asked for inside the fused loss's forward.
    head_positions, in_loss = [], []
    original_logps = fused_trl.completion_logps

    def completion_logps(*a, **k):
        in_loss.append(True)
        try:
            return original_logps(*a, **k)
        finally:
            in_loss.pop()

    monkeypatch.setattr(fused_trl, "completion_logps", completion_logps)

    def watch_head(trainer):
        trainer.model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: head_positions.append(out.shape[1]) if in_loss else None
        )

    trl_logs, trl_weights = _train(tmp_path, None, **options)
    fused_logs, fused_weights = _train(tmp_path, fused, on_built=watch_head, **options)
    used = "linear_selective_log_softmax" if path == "hidden" else "fused_log_probs"
    assert calls == {**{name: 0 for name in calls}, used: 3 * 2}  # 3 steps x 2 micro-batches
    if path == "hidden":
        assert head_positions == [1] * 6  # never the completion's [B, L, V] logits
    else:
        assert head_positions == [7] * 6  # L + 1 = max_completion_length + 1 positions
    assert len(trl_logs) == len(fused_logs) == 3
    for ours, theirs in zip(fused_logs, trl_logs, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
        for key in ("kl", "entropy", "clip_ratio/region_mean", "reward"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert any(abs(h["loss"]) > 1e-6 for h in trl_logs)
    for name, value in trl_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-4, atol=1e-5)


def test_unsupported_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="entropy_coef"):
        _train(tmp_path, "subclass", entropy_coef=0.01)


@pytest.mark.parametrize(
    "attributes,named",
    [
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
        (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
        (dict(_entropy_bonus_enabled=True), "entropy_coef"),
        (dict(aux_loss_enabled=True), "MoE auxiliary loss"),
    ],
)
def test_each_loss_option_outside_the_kernel_is_refused(attributes, named):
    """What TRL's loss adds on top of the GRPO objective is refused at set-up, never dropped."""
    trainer = SimpleNamespace(top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                              _entropy_bonus_enabled=False, aux_loss_enabled=False)
    fused_trl.check_supported(trainer)
    for key, value in attributes.items():
        setattr(trainer, key, value)
    with pytest.raises(ValueError, match=named):
        fused_trl.enable_fused_loss(trainer)


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "2.0.0"])
def test_unsupported_trl_versions_are_refused(monkeypatch, version):
    assert trl.__version__ in fused_trl.SUPPORTED_TRL  # the installed one is supported
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(ValueError, match=f"supports TRL >=1.16,<1.17.*this is TRL {version}"):
        fused_trl.FusedGRPOTrainer(model="never-built", reward_funcs=[])
    with pytest.raises(ValueError, match="supports TRL"):
        fused_trl.check_supported(SimpleNamespace())
