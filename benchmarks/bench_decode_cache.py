"""Decoding with the in-place KV cache (``GrowingLayer``) against transformers' ``DynamicCache``.

Run: ``python benchmarks/bench_decode_cache.py [--repeats N] [--threads T]``.

The built-in engine's ``generate`` on the tiny-cpu preset's model (untrained, so every row runs
to the token budget) and embedded-world prompts, in the preset's two decode shapes:

* ``grpo_det rollout``: 8 detection prompts x G=16 sampled completions, 48 new tokens;
* ``held-out eval``: 64 prompts of several tasks, greedy, 1 completion each, 96 new tokens.

Anchor: ``geovlm.prefix.decoding_cache`` replaced by a plain ``DynamicCache`` (its layers
concatenate each step's keys and values onto the whole cache). Ours: the decoding cache as
shipped. The calls alternate, same seed; both must return the same completions and log-probs
before their times count. Reports the median seconds per call and the ratio anchor / ours.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from dataclasses import asdict

import _provenance  # benchmarks/_provenance.py: the script's directory is on sys.path
import torch
from transformers import DynamicCache

from geovlm import prefix
from geovlm.config import load_config
from geovlm.data.sources import load_splits, select_tasks
from geovlm.data.synthetic import corpus
from geovlm.engines.base import EngineSetup, Sampling
from geovlm.engines.builtin import BuiltinEngine
from geovlm.model import build_policy

SHIPPED = prefix.decoding_cache


def dynamic_cache(model):
    return DynamicCache(config=model.config.get_text_config())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()

    config = load_config(None, ["data.n_train_scenes=0", "data.n_val_scenes=0"])
    splits = load_splits(config.data, config.model.box_convention)
    test = splits["test"]
    model, processor = build_policy(
        tokenizer_corpus=corpus(test), tiny=asdict(config.model.tiny), seed=config.seed
    )
    model.eval()
    torch.set_num_threads(args.threads or config.threads or torch.get_num_threads())
    engine = BuiltinEngine(model, processor, EngineSetup(share_prompt=True))
    det = next(s for s in config.stages if s.name == "grpo_det")
    cases = {
        "grpo_det rollout": (
            select_tasks(test, ["referred_det"])[: det.batch_size],
            det.num_generations,
            Sampling(max_new_tokens=det.max_new_tokens, temperature=det.temperature, seed=0,
                     return_logprobs=True),
        ),
        "held-out eval": (
            test[:: max(1, len(test) // config.eval.batch_size)][: config.eval.batch_size],
            1,
            Sampling(max_new_tokens=config.eval.max_new_tokens, greedy=True),
        ),
    }

    print(f"# {_provenance.machine()}, load {_provenance.load_text()}, "
          f"commit {_provenance.commit()}, {datetime.date.today()}, "
          f"{torch.get_num_threads()} thread(s)")
    print("| case | rows x new tokens | anchor: DynamicCache s | ours: GrowingLayer s | ratio |")
    print("|---|---|---|---|---|")
    for name, (samples, generations, sampling) in cases.items():
        times: dict[str, list[float]] = {"anchor": [], "ours": []}
        results = {}
        for _ in range(args.repeats):
            for side, make in (("anchor", dynamic_cache), ("ours", SHIPPED)):
                prefix.decoding_cache = make
                start = time.perf_counter()
                results[side] = engine.generate(samples, generations, sampling)
                times[side].append(time.perf_counter() - start)
        prefix.decoding_cache = SHIPPED
        a, b = results["anchor"], results["ours"]
        assert torch.equal(a.completion_ids, b.completion_ids), "completions differ"
        if a.logprobs is not None:
            torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-6)
        anchor, ours = (statistics.median(times[k]) for k in ("anchor", "ours"))
        shape = f"{b.completion_ids.shape[0]} x {b.completion_ids.shape[1]}"
        print(f"| {name} | {shape} | {anchor:.3f} | {ours:.3f} | {anchor / ours:.2f}x |")


if __name__ == "__main__":
    main()
