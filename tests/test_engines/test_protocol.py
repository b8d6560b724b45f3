"""geovlm.engines: the registry, the config key, the protocol every engine keeps, and the seam.

The seam is checked with a second engine defined here, ``CopyEngine``: like a vLLM engine it
samples from its own copy of the weights, which only ``sync_weights`` updates. Registered under
another name, it must give a GRPO run identical to the built-in engine's (so the stage calls
``sync_weights`` after every update and before every rollout, and needs nothing else from an
engine), and the evaluation must decode with it when configured.

Every registered engine is held to the protocol's contract by ``test_engine_keeps_the_contract``
(oracles: the collated prompts, the tokenizer's own decode, the mask rule, the model's argmax).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from geovlm.config import ConfigError, RolloutConfig, RunConfig, StageConfig, load_config
from geovlm.data.collate import collate_prompts
from geovlm.engines import ENGINES, build_engine
from geovlm.engines.base import EngineSetup, RolloutEngine, Sampling
from geovlm.engines.builtin import BuiltinEngine
from geovlm.engines.completions import assemble_rollouts, special_ids, vision_token_ids
from geovlm.model import unwrap
from tests.test_model import make_sample, tiny_policy

COPY_ENGINE = "tests.test_engines.test_protocol:CopyEngine"
BUILT: list[CopyEngine] = []


class CopyEngine:
    """The built-in sampler on a private copy of the policy, refreshed only by ``sync_weights``.

    At each ``generate`` it records how far its copy is from the policy it was last synced
    from (``staleness``) and a checksum of that policy (to show the policy did move).
    """

    def __init__(self, model, processor, setup: EngineSetup):
        self.policy = model
        self.copy = copy.deepcopy(unwrap(model))
        self.inner = BuiltinEngine(self.copy, processor, setup)
        self.syncs = 0
        self.staleness: list[float] = []
        self.checksums: list[float] = []
        BUILT.append(self)

    def sync_weights(self, model) -> None:
        self.copy.load_state_dict(unwrap(model).state_dict())
        self.policy = model
        self.syncs += 1

    @torch.no_grad()
    def generate(self, samples, num_generations, sampling):
        pairs = zip(self.copy.parameters(), unwrap(self.policy).parameters(), strict=True)
        self.staleness.append(max(float((a - b).abs().max()) for a, b in pairs))
        self.checksums.append(float(sum(p.double().sum() for p in self.policy.parameters())))
        return self.inner.generate(samples, num_generations, sampling)


@pytest.fixture
def copy_engine(monkeypatch):
    monkeypatch.setitem(ENGINES, "copy", COPY_ENGINE)
    BUILT.clear()
    yield BUILT
    BUILT.clear()


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(4)
    return [make_sample(rng, 0), make_sample(rng, 1, ((112, 112), (84, 140)))]


def test_an_unknown_engine_is_a_config_error_naming_the_known_ones():
    message = r"rollout\.engine: unknown rollout engine 'vllm'; known: \['builtin'\]"
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["rollout.engine=vllm"])
    assert load_config(None, ["rollout.engine=builtin"]).rollout.engine == "builtin"
    with pytest.raises(ValueError, match=r"unknown rollout engine 'sglang'; known: \['builtin'\]"):
        build_engine("sglang", None, None, EngineSetup())


def test_a_registered_engine_is_accepted_and_built(copy_engine):
    assert load_config(None, ["rollout.engine=copy"]).rollout.engine == "copy"
    model, processor = tiny_policy(seed=1)
    engine = build_engine("copy", model, processor, EngineSetup(share_prompt=False))
    assert isinstance(engine, CopyEngine) and engine.inner.setup.share_prompt is False


def test_the_registry_and_the_config_import_no_engine():
    """Naming engines costs nothing: neither torch nor an engine module is imported."""
    code = (
        "import sys, geovlm.config, geovlm.engines; "
        "print(sorted(m for m in sys.modules if m in ('torch', 'transformers') "
        "or m.startswith('geovlm.engines.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
    ],
)
def test_bad_sampling_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_assembling_rows_that_do_not_match_the_prompts_is_a_clear_error():
    prompts = {"input_ids": torch.ones(2, 5, dtype=torch.long)}
    ids = torch.ones(5, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="do not hold 3 rows for each of 2 prompts"):
        assemble_rollouts(prompts, 0, ids, torch.ones_like(ids), None, [1], 3, 1.0)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_engine_keeps_the_contract(name, samples):
    model, processor = tiny_policy(seed=3)
    model.train()
    tokenizer = processor.tokenizer
    eos, pad = special_ids(tokenizer)
    engine = build_engine(name, model, processor, EngineSetup())
    assert isinstance(engine, RolloutEngine)
    G, L = 3, 6
    state = torch.random.get_rng_state()
    rollouts = engine.generate(samples, G, Sampling(L, temperature=1.3, seed=5))
    assert torch.equal(torch.random.get_rng_state(), state) and model.training

    assert rollouts.num_generations == G and len(rollouts.texts) == G * len(samples)
    assert rollouts.sample_index.tolist() == [0, 0, 0, 1, 1, 1]
    expected_prompts = collate_prompts(samples, processor)
    for key, value in expected_prompts.items():
        assert torch.equal(rollouts.unique_prompt[key].cpu(), value), key
    ids, mask = rollouts.completion_ids.cpu(), rollouts.completion_mask.cpu()
    assert ids.shape == mask.shape and ids.shape[1] <= L and rollouts.logprobs is None
    assert not set(vision_token_ids(model.config)) & set(ids[mask.bool()].tolist())
    for row in range(ids.shape[0]):
        ends = [j for j, token in enumerate(ids[row].tolist()) if token in eos]
        stop = ends[0] + 1 if ends else ids.shape[1]
        assert mask[row].tolist() == [1] * stop + [0] * (ids.shape[1] - stop)
        assert (ids[row, stop:] == pad).all() and bool(rollouts.finished[row]) == bool(ends)
        content = ids[row, : stop - 1] if ends else ids[row]
        assert rollouts.texts[row] == tokenizer.decode(content, skip_special_tokens=True)

    scored = engine.generate(samples, G, Sampling(L, temperature=1.3, seed=5, return_logprobs=True))
    assert torch.equal(scored.completion_ids, rollouts.completion_ids)
    assert scored.logprobs.dtype == torch.float32 and scored.logprobs.shape == ids.shape
    assert (scored.logprobs.cpu()[~mask.bool()] == 0).all()
    kept = scored.logprobs.cpu()[mask.bool()]
    assert torch.isfinite(kept).all() and (kept <= 0).all()

    # sync_weights: with every logit 0, greedy decoding picks the lowest id that may appear.
    vision = set(vision_token_ids(model.config))
    lowest = next(i for i in range(len(tokenizer)) if i not in vision)
    expected = torch.full((len(samples), 1 if lowest in eos else L), lowest)
    greedy = Sampling(L, greedy=True)
    assert not torch.equal(engine.generate(samples, 1, greedy).completion_ids.cpu(), expected)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    engine.sync_weights(model)
    assert torch.equal(engine.generate(samples, 1, greedy).completion_ids.cpu(), expected)


@dataclass
class ProbeRewards:
    total: np.ndarray
    components: dict[str, np.ndarray]


def probe_rewards(rollouts, samples, stage, options) -> ProbeRewards:
    """A deterministic reward of each completion's text that differs between completions, so
    the advantages, hence the updates, are not zero (an untrained model earns no task reward)."""
    values = np.array([(zlib.crc32(t.encode()) % 1009) / 1008.0 for t in rollouts.texts])
    return ProbeRewards(values, {"probe": values})


class Records:
    def __init__(self):
        self.rows: list[dict] = []

    def write(self, record: dict) -> None:
        self.rows.append(record)


def _grpo_records(engine_name: str, tmp_path, samples, monkeypatch) -> list[dict]:
    from geovlm import grpo
    from geovlm.loop import StageContext
    from geovlm.runtime import Runtime

    monkeypatch.setattr(grpo, "score_rollouts", probe_rewards)
    model, processor = tiny_policy(seed=6)
    stage = StageConfig(
        name="grpo", kind="grpo", steps=3, batch_size=2, num_generations=3, max_new_tokens=6,
        lr=0.01, warmup_ratio=0.0, save_every=0, beta=0.0,
    )
    config = RunConfig(
        output_dir=str(tmp_path / engine_name), stages=[stage],
        rollout=RolloutConfig(engine=engine_name),
    )
    log = Records()
    ctx = StageContext(config, stage, 0, Runtime(0, 1, 0, torch.device("cpu"), 1), log=log)
    grpo.run_grpo(model, processor, samples, ctx)
    return log.rows


def test_grpo_with_an_engine_holding_its_own_weights_equals_the_builtin_run(
    copy_engine, samples, tmp_path, monkeypatch
):
    builtin = _grpo_records("builtin", tmp_path, samples, monkeypatch)
    copied = _grpo_records("copy", tmp_path, samples, monkeypatch)
    (engine,) = copy_engine
    assert engine.syncs == 3  # once per step, after its optimizer update
    assert engine.staleness == [0.0, 0.0, 0.0]  # every rollout saw the current weights
    assert len(set(engine.checksums)) == 3  # ... and the weights did change between them
    assert [r["reward"] for r in builtin] == [r["reward"] for r in copied]
    assert builtin == copied


def test_evaluation_decodes_with_the_configured_engine(copy_engine, samples):
    from geovlm.eval import greedy_generator

    model, processor = tiny_policy(seed=2)
    by_builtin = greedy_generator(model, processor, 7)(samples)
    by_copy = greedy_generator(model, processor, 7, rollout_engine="copy")(samples)
    assert len(copy_engine) == 1 and len(copy_engine[0].staleness) == 1
    assert by_copy == by_builtin and len(by_copy) == len(samples)
