"""Runs of ``geovlm.train`` under torchrun for tests/test_distributed.py, and the probes both the
torchrun worker and the single-process baseline install.

Launched as ``python -m torch.distributed.run --nproc_per_node N --module tests._distributed_worker
SPEC.json``: as a module, so that ``tests/`` never lands on ``sys.path`` (where a test folder could
shadow an installed package). SPEC is ``{"collectives": OUT.json, "optimizers": OUT.json, "runs":
[{"argv": [...], "crash_after": k}]}`` (``crash_after`` optional). ``check_collectives`` first
reduces known per-rank values into its OUT.json; then every run is ``geovlm.train.main(argv)``
(the code path of ``python -m geovlm.train``), all in one process group so that the interpreter
and the process group start once; "optimizers" receives the class of the optimizer DeepSpeed
steps in each DeepSpeed run (``record_optimizers``). A run with ``crash_after=k`` raises on every
rank at its k-th optimizer step (as if killed there) and is then run again, which resumes from
its last checkpoint.

Probes, so that a run's numbers do not depend on how the batch is split over ranks:

- ``seeded_rollouts``: each prompt's group is sampled by its own call of the built-in rollout
  engine's ``generate`` with a seed derived from the step's seed and the sample id. A call
  samples a whole batch from one RNG stream, so without this the rows a rank draws depend on
  which other prompts share its batch.
  The EOS logit is raised by ``EOS_BIAS`` so that completions end at different lengths.
- ``probe_rewards``: adds a deterministic reward of the completion text to the real ones (which
  are all 0 for an untrained tiny model), so that advantages, hence gradients, are not all zero.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import torch

EOS_BIAS = 4.0


def probe_reward(text: str) -> float:
    """A deterministic reward in [0, 1] that differs between most completions."""
    return (zlib.crc32(text.encode()) % 1009) / 1008.0


def probe_rewards(original: Callable) -> Callable:
    from geovlm.rewards import RewardBatch

    def score(tasks, completions, targets, *args, **kwargs):
        real = original(tasks, completions, targets, *args, **kwargs)
        probe = np.array([probe_reward(t) for t in completions], dtype=np.float64)
        return RewardBatch(total=real.total + probe, components={**real.components, "probe": probe})

    return score


def _pad_right(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat(
        [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors]
    )


def seeded_rollouts(original: Callable) -> Callable:
    """``BuiltinEngine.generate`` with each prompt's group drawn from its own seeded generator."""
    from geovlm.data.collate import collate_prompts
    from geovlm.engines.completions import assemble_rollouts, special_ids
    from geovlm.model import unwrap

    def generate(self, samples, num_generations, sampling):
        step_seed = torch.initial_seed()  # the step's seed (seed_everything), equal on all ranks
        eos, pad = special_ids(self.processor.tokenizer)

        def favour_eos(module, inputs, logits):
            # While sampling only: completion lengths, hence per-rank token counts and the
            # steps at which ranks finish decoding, differ.
            logits = logits.clone()
            logits[..., eos] += EOS_BIAS
            return logits

        hook = unwrap(self.model).get_output_embeddings().register_forward_hook(favour_eos)
        try:
            pieces = [
                original(
                    self,
                    [sample],
                    num_generations,
                    # replaces the call's own seed
                    dataclasses.replace(
                        sampling,
                        seed=(step_seed + zlib.crc32(sample.id.encode())) % (2**31 - 1),
                    ),
                )
                for sample in samples
            ]
        finally:
            hook.remove()
        device = pieces[0].completion_ids.device
        unique = collate_prompts(samples, self.processor, self.setup.system_prompt)
        logprobs = None
        if sampling.return_logprobs:
            logprobs = _pad_right([p.logprobs for p in pieces], 0.0)
        return assemble_rollouts(
            {k: v.to(device) for k, v in unique.items()},
            int(self.model.config.image_token_id),
            _pad_right([p.completion_ids for p in pieces], pad),
            _pad_right([p.completion_mask for p in pieces], 0),
            self.processor.tokenizer,
            eos,
            num_generations,
            sampling.temperature,
            logprobs,
        )

    return generate


def install_probes(stack: ExitStack) -> None:
    """Patch the probes into ``geovlm`` for as long as ``stack`` is open."""
    import geovlm.rewards
    from geovlm.engines.builtin import BuiltinEngine

    stack.enter_context(
        mock.patch.object(BuiltinEngine, "generate", seeded_rollouts(BuiltinEngine.generate))
    )
    stack.enter_context(
        mock.patch.object(geovlm.rewards, "score", probe_rewards(geovlm.rewards.score))
    )


class Crash(RuntimeError):
    pass


def crash_after(stack: ExitStack, n: int) -> None:
    """Make the n-th optimizer step (any engine) raise, on every rank alike."""
    from geovlm import distributed

    calls = {"n": 0}
    for cls in (distributed.Engine, distributed.DeepSpeedEngine):
        original = cls.step

        def step(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise Crash(f"killed at optimizer step {n}")
            return _original(self, *args, **kwargs)

        stack.enter_context(mock.patch.object(cls, "step", step))


def record_optimizers(stack: ExitStack, seen: dict[str, str]) -> None:
    """Record, per run (output folder name), the class of the optimizer DeepSpeed steps."""
    from geovlm import distributed

    original = distributed._deepspeed_engine

    def build(model, config, *args, **kwargs):
        engine = original(model, config, *args, **kwargs)
        seen[config.name] = type(engine.model.basic_optimizer).__name__
        return engine

    stack.enter_context(mock.patch.object(distributed, "_deepspeed_engine", build))


def check_collectives(out: Path) -> None:
    """Reduce rank-dependent metrics and rows; rank 0 writes what it got (the test has oracles)."""
    from geovlm.runtime import gather_rows, reduce_metrics, start

    rank = start(device="cpu").rank
    values = [
        {"kl": 0.1, "loss": 1.0, "clip_ratio/low_min": math.nan, "clip_ratio/high_max": math.nan},
        {"kl": 0.3, "loss": 2.0, "clip_ratio/low_min": 0.2, "clip_ratio/high_max": math.nan},
    ][rank]
    reduced = reduce_metrics(values, {"kl": [3.0, 1.0][rank]})
    total, parts = gather_rows((np.arange(rank + 1) + 10.0 * rank, {"a": np.full(2, rank)}))
    if rank == 0:
        result = {"reduced": reduced, "total": total.tolist(), "a": parts["a"].tolist()}
        out.write_text(json.dumps(result))


def main(spec_path: str) -> int:
    from geovlm.train import main as train_main

    spec = json.loads(Path(spec_path).read_text())
    check_collectives(Path(spec["collectives"]))
    optimizers: dict[str, str] = {}
    with ExitStack() as probes:
        install_probes(probes)
        record_optimizers(probes, optimizers)
        for run in spec["runs"]:
            if run.get("crash_after"):
                with ExitStack() as crash:
                    crash_after(crash, run["crash_after"])
                    try:
                        train_main(run["argv"])
                    except Crash:
                        pass
                    else:
                        raise AssertionError(f"run {run['argv']} did not reach the crash")
            if train_main(run["argv"]) != 0:
                return 1
    if torch.distributed.get_rank() == 0:
        Path(spec["optimizers"]).write_text(json.dumps(optimizers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
