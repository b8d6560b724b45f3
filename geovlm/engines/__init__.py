"""Rollout engines: G completions per prompt behind one small protocol.

The GRPO stage (rollouts, the sampled-reward objective) and the evaluation get their sampler
from ``build_engine(config.rollout.engine, model, processor, setup)`` and only ever call
``generate`` and ``sync_weights`` on it (``geovlm.engines.base.RolloutEngine``), plus its
optional ``prepare`` (``geovlm.engines.base.prompt_preparer``), the CPU work on the prompts that
background workers do ahead of time::

    engine = build_engine("builtin", policy, processor, EngineSetup(share_prompt=True))
    rollouts = engine.generate(samples, num_generations=8, sampling=Sampling(max_new_tokens=64))
    ...                                # rewards, advantages, loss, optimizer step
    engine.sync_weights(policy)        # before the next generate

Engines (``ENGINES``, name -> ``"module:Class"``, imported only when built, so that a name in
the registry costs nothing until it is chosen and an engine's own dependency, vLLM say, is needed
only by the runs that choose it):

- ``builtin``: ``geovlm.engines.builtin.BuiltinEngine``, the policy module samples in process
  (each prompt prefilled once per group and a lean decode loop; HF ``generate`` without prompt
  sharing).

How to add a rollout engine (``docs/rollout_engines.md`` has the long form):

1. One module ``geovlm/engines/<name>.py`` with a class built as
   ``Class(model, processor, setup: EngineSetup)`` that provides
   ``generate(samples, num_generations, sampling: Sampling) -> Rollouts`` and
   ``sync_weights(model) -> None``. ``generate`` collates the prompts with
   ``geovlm.data.collate.collate_prompts(samples, processor, setup.system_prompt)`` (the GRPO
   passes score the completions after exactly those tokens), samples ``[N, Lc]`` ids (rows
   ``i*G .. i*G+G-1`` for ``samples[i]``, right-padded with the pad id of
   ``completions.special_ids``, vision tokens of ``completions.vision_token_ids`` never sampled,
   each row stopped at its first EOS), and returns ``completions.assemble_rollouts(...)``;
   ``sampling.return_logprobs`` asks for the sampled tokens' log-probs too. ``sync_weights``
   loads ``model``'s current weights into the engine's own copy (gathered first when sharded;
   every rank calls it); the GRPO loop calls it after each step's optimizer updates.
2. One entry in ``ENGINES``: ``"<name>": "geovlm.engines.<name>:<Class>"``. The config key
   ``rollout.engine`` accepts it from then on; any other name is a config error listing these.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from geovlm.engines.base import EngineSetup, RolloutEngine

ENGINES: dict[str, str] = {
    "builtin": "geovlm.engines.builtin:BuiltinEngine",
}


def check_engine_name(name: str) -> None:
    """Raise ``ValueError`` naming the known engines unless ``name`` is one of them."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; known: {sorted(ENGINES)}")


def build_engine(
    name: str, model: torch.nn.Module, processor, setup: EngineSetup
) -> RolloutEngine:
    """The engine registered as ``name``, built for ``model`` and ``processor``."""
    check_engine_name(name)
    module_name, _, class_name = ENGINES[name].partition(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    return engine_class(model, processor, setup)
