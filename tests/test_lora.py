"""LoRA through PEFT (``model.lora``): adapters, the adapter-disabled reference, files, runs.

Oracles: a frozen deep copy of the base model (what the reference was before LoRA), the full
forward for the shared-prompt passes (``tests.test_prefix``), PEFT's own
``PeftModel.from_pretrained(...).merge_and_unload()`` for the saved adapters, and an
uninterrupted run for resume.
"""

from __future__ import annotations

import copy
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch

from geovlm.advantages import group_advantages
from geovlm.config import ConfigError, LoraConfig, RunConfig, StageConfig, load_config
from geovlm.data.collate import collate_prompts
from geovlm.distributed import prepare_engine
from geovlm.engines.base import EngineSetup, Sampling
from geovlm.engines.builtin import BuiltinEngine
from geovlm.grpo import build_policy_batch, completion_logps, policy_loss, reference_logps
from geovlm.loop import StageContext
from geovlm.lora import target_module_names
from geovlm.runtime import Runtime
from tests._distributed_worker import install_probes
from tests.test_model import make_sample, tiny_policy
from tests.test_prefix import _check
from tests.test_train import TINY, Crash, crash_on_call

G = 3
RUNTIME = Runtime(0, 1, 0, torch.device("cpu"), 1)


def lora_config(**lora) -> RunConfig:
    config = RunConfig()
    config.model.lora = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0, **lora)
    return config


def with_adapters(model, config: RunConfig, stage: StageConfig, seed: int = 0):
    """The engine of ``model`` with fresh adapters, their B moved off zero so that the policy
    differs from the base."""
    engine = prepare_engine(model, config, stage, RUNTIME)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in engine.policy.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return engine


# --------------------------------------------------------------------------- target modules


def test_default_targets_are_the_language_models_attention_and_mlp_projections():
    model, _ = tiny_policy(seed=1)
    names = target_module_names(model, LoraConfig())
    layers = model.config.get_text_config().num_hidden_layers
    assert len(names) == 7 * layers
    assert all(n.startswith("model.language_model.layers.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    with_vision = target_module_names(model, LoraConfig(vision=True))
    vision = [n for n in with_vision if n.startswith("model.visual.")]
    assert len(vision) == 5 * model.config.vision_config.depth
    assert all(".blocks." in n for n in vision)  # never the merger, never lm_head
    with pytest.raises(ConfigError, match="q_proj"):
        target_module_names(model, LoraConfig(target_modules=["query"]))


@pytest.mark.parametrize(
    "override, message",
    [("model.lora.r=0", "r=0"), ("model.lora.dropout=1.0", "dropout"),
     ("model.lora.target_modules=[]", "at least one")],
)
def test_bad_lora_settings_are_refused_before_anything_is_built(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.lora.enabled=true", override])


def test_only_the_adapters_train_and_they_start_at_the_base():
    model, processor = tiny_policy(seed=1)
    base = copy.deepcopy(model)
    engine = prepare_engine(model, lora_config(), StageConfig(), RUNTIME)
    trainable = [n for n, p in engine.policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimized = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in engine.policy.parameters() if p.requires_grad}
    rng = np.random.default_rng(0)
    prompts = collate_prompts([make_sample(rng, 0)], processor)
    with torch.no_grad():
        torch.testing.assert_close(engine.policy(**prompts).logits, base(**prompts).logits)


# --------------------------------------------------------------------------- the reference


@pytest.fixture(scope="module")
def rollouts_setup():
    model, processor = tiny_policy(seed=5)
    rng = np.random.default_rng(3)
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (84, 140)))]
    engine = BuiltinEngine(model, processor, EngineSetup())
    rollouts = engine.generate(samples, G, Sampling(max_new_tokens=6, seed=2))
    return model, rollouts


@pytest.mark.parametrize("share_prompt", [True, False])
def test_disabled_adapters_give_the_loss_and_gradients_of_a_frozen_base_copy(
    rollouts_setup, share_prompt
):
    """The GRPO step with the reference log-probs of (a) a frozen deep copy of the base, as
    without LoRA, and (b) the policy with its adapters disabled: same numbers."""
    base, rollouts = rollouts_setup
    model = copy.deepcopy(base)
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    stage = StageConfig(kind="grpo", beta=0.04, loss_type="dapo", prompt_sharing=share_prompt)
    config = lora_config()
    engine = with_adapters(model, config, stage)
    ctx = StageContext(config, stage, 1, RUNTIME)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.3, 0.9])
    advantages, _ = group_advantages(rewards, G, "group")
    batch = build_policy_batch(rollouts, advantages, torch.device("cpu"))

    copied = reference_logps(engine, reference, batch, 1.0, share_prompt)
    disabled = reference_logps(engine, None, batch, 1.0, share_prompt)
    mask = rollouts.completion_mask.bool()
    torch.testing.assert_close(disabled[mask], copied[mask], rtol=0, atol=1e-6)
    # The adapters are back on afterwards: the policy is not the reference.
    policy = completion_logps(engine.policy, batch, 1.0, share_prompt)
    assert (policy - disabled)[mask].abs().max() > 1e-3

    results = []
    for ref in (copied, disabled):
        batch.ref_logps = ref
        engine.policy.zero_grad()
        loss, metrics = policy_loss(engine.model, batch, ctx)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in engine.policy.named_parameters()
                 if p.grad is not None}
        results.append((loss.item(), float(metrics["kl"]), grads))
    (loss_a, kl_a, grads_a), (loss_b, kl_b, grads_b) = results
    assert kl_a > 1e-4 and abs(kl_a - kl_b) < 1e-6
    assert abs(loss_a - loss_b) < 1e-6
    assert grads_a.keys() == grads_b.keys() and all(".lora_" in n for n in grads_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7)


def test_shared_prompt_passes_with_adapters_equal_the_full_forward():
    """geovlm.prefix on the PEFT-injected model: hidden states and adapter gradients."""
    model, processor = tiny_policy(seed=5)
    model = model.double()
    engine = with_adapters(model, lora_config(vision=True), StageConfig(kind="grpo"))
    rng = np.random.default_rng(4)
    samples = [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (84, 140)))]
    _check(engine.policy, collate_prompts(samples, processor), 3, 5, seed=1)


@pytest.mark.parametrize("variant", ["fused_linear", "checkpointing"])
def test_the_fused_linear_loss_and_checkpointing_give_the_same_step_with_adapters(
    rollouts_setup, variant
):
    """The fused linear kernel reads the frozen lm_head.weight; checkpointed layers replay the
    adapters: same loss and adapter gradients as the plain logits path."""
    from geovlm.model import disable_checkpointing, enable_checkpointing

    base, rollouts = rollouts_setup
    stage = StageConfig(kind="grpo", beta=0.04, loss_type="dapo")
    config = lora_config()
    engine = with_adapters(copy.deepcopy(base), config, stage)
    ctx = StageContext(config, stage, 1, RUNTIME)
    advantages, _ = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.25, 0.3, 0.9]), G, "group")
    batch = build_policy_batch(rollouts, advantages, torch.device("cpu"))
    batch.ref_logps = reference_logps(engine, None, batch, 1.0, True)
    results = []
    for special in (False, True):
        if special and variant == "checkpointing":
            enable_checkpointing(engine.policy)
        engine.policy.zero_grad()
        loss, _ = policy_loss(
            engine.model, batch, ctx, fused_linear=special and variant == "fused_linear"
        )
        loss.backward()
        disable_checkpointing(engine.policy)
        results.append((loss.item(), {n: p.grad.clone() for n, p in
                                      engine.policy.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- runs

STAGES = (
    "stages=[{name: sft, kind: sft, steps: 2, batch_size: 4, save_every: 0, lr: 0.01},"
    " {name: grpo, kind: grpo, tasks: [scene_cls, counting], steps: 3, batch_size: 2,"
    "  num_generations: 3, max_new_tokens: 6, save_every: 1, beta: 0.04, lr: 0.01}]"
)
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0",
        "model.lora.merge_on_save=true", "report_to=none"]


def run_lora(tmp_path: Path, name: str, crash_at: int | None = None, monkeypatch=None):
    from geovlm.train import run

    config = load_config(None, [f"output_dir={tmp_path}", f"name={name}", *TINY, STAGES, *LORA])
    with ExitStack() as probes:
        install_probes(probes)  # rewards that vary, so that GRPO has gradients
        if crash_at is not None:
            crash_on_call(monkeypatch, crash_at)
            with pytest.raises(Crash):
                run(config)
            monkeypatch.undo()
        run(config)
    return config


def records(config):
    lines = (config.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sft_then_grpo_with_adapters_end_to_end(tmp_path, monkeypatch):
    """Adapters per stage, the KL to the stage's start model, PEFT-format files whose merge is
    PEFT's own, merged weights that load alone, exact resume, and geovlm.eval on both."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from geovlm.eval import main as eval_main
    from geovlm.model import build_policy

    straight = run_lora(tmp_path, "straight")
    # Dies in GRPO's step 1 (SFT takes 2 optimizer steps), after checkpoint-1.
    resumed = run_lora(tmp_path, "resumed", crash_at=2 + 2, monkeypatch=monkeypatch)

    want = records(straight)
    keys = ("stage", "step", "loss", "grad_norm", "kl", "reward")
    assert [tuple(r.get(k) for k in keys) for r in records(resumed)] == [
        tuple(r.get(k) for k in keys) for r in want
    ]
    grpo = [r for r in want if r["stage"] == "grpo"]
    # The policy starts as its reference (the merged SFT model): KL exactly 0 at first, then not.
    assert grpo[0]["kl"] == 0.0 and grpo[-1]["kl"] > 0
    assert all(r["grad_norm"] > 0 for r in want)

    run_dir = straight.run_dir
    init = run_dir / "init"
    sft, grpo_dir = run_dir / "stages" / "0-sft" / "final", run_dir / "stages" / "1-grpo" / "final"
    for folder in (sft, grpo_dir, run_dir / "stages" / "1-grpo" / "checkpoint-2"):
        assert (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()
    saved = json.loads((grpo_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(sft.resolve()) and saved["r"] == 4
    assert json.loads((sft / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(init.resolve())

    # Oracle: PEFT itself stacks the two stages' adapters on init/.
    base = AutoModelForImageTextToText.from_pretrained(init)
    base_state = state(base)  # merging changes the model in place
    after_sft = PeftModel.from_pretrained(base, sft).merge_and_unload()
    after_grpo = PeftModel.from_pretrained(after_sft, grpo_dir).merge_and_unload()
    want_state = state(after_grpo)
    merged = AutoModelForImageTextToText.from_pretrained(grpo_dir / "merged")
    chained, _ = build_policy(path=str(grpo_dir))
    for loaded in (merged, chained):
        got = state(loaded)
        assert got.keys() == want_state.keys()
        for key, value in want_state.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    changed = [k for k, v in base_state.items() if not torch.equal(v, want_state[k])]
    assert changed and all(".language_model.layers." in k for k in changed)

    out = {}
    for name, folder in (("adapters", grpo_dir), ("merged", grpo_dir / "merged")):
        out[name] = tmp_path / f"eval_{name}"
        code = eval_main(["--checkpoint", str(folder), "--data", "embedded", "--out",
                          str(out[name]), "--max-new-tokens", "6", "--device", "cpu"])
        assert code == 0
    predictions = [(out[n] / "predictions.jsonl").read_text() for n in ("adapters", "merged")]
    assert predictions[0] == predictions[1]


def test_a_checkpoint_of_other_adapters_is_refused(tmp_path):
    from geovlm.lora import read_adapter_state, save_adapters

    model, _ = tiny_policy(seed=1)
    engine = prepare_engine(model, lora_config(), StageConfig(), RUNTIME)
    save_adapters(engine.adapters, tmp_path, engine.policy.state_dict())
    assert len(read_adapter_state(tmp_path, engine.policy)) == 2 * 7 * 2
    other, _ = tiny_policy(seed=1)
    narrow = prepare_engine(other, lora_config(target_modules=["q_proj"]), StageConfig(), RUNTIME)
    with pytest.raises(RuntimeError, match="unexpected"):
        read_adapter_state(tmp_path, narrow.policy)
