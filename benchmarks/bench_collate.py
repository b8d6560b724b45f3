"""SFT collation with the encoding cache against encoding every drawn sample afresh.

Run: ``python benchmarks/bench_collate.py [--steps N] [--scenes S]``.

The tiny-cpu preset's SFT stage: its processor, its training split (``S`` scenes, the preset's
600 by default), its task weights and batch size, and the batches ``run_sft`` draws in its first
``N`` steps (the preset's 800 by default). Anchor: ``collate_sft(..., cache=None)``, every
sample encoded by the processor each time it is drawn (what the stage did before the cache).
Ours: ``collate_sft`` with a fresh ``EncodingCache`` over the same steps, so its first encodings
are paid here too. Every ``--check-every``-th batch of both must be equal, tensor by tensor.
Reports the total seconds of each, the ratio, the cache's hit rate and the memory it holds.
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import asdict

import _provenance  # benchmarks/_provenance.py: the script's directory is on sys.path
import torch

from geovlm.config import load_config
from geovlm.data.collate import collate_sft
from geovlm.data.encoding_cache import EncodingCache
from geovlm.data.sources import load_splits, select_tasks, weigh_tasks
from geovlm.data.synthetic import corpus
from geovlm.loop import batch_indices
from geovlm.model import build_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--scenes", type=int, default=None, help="default: the preset's")
    parser.add_argument("--check-every", type=int, default=50)
    args = parser.parse_args()

    overrides = [] if args.scenes is None else [f"data.n_train_scenes={args.scenes}"]
    config = load_config(None, overrides)
    stage = next(s for s in config.stages if s.kind == "sft")
    steps = args.steps or stage.steps
    splits = load_splits(config.data, config.model.box_convention)
    train = weigh_tasks(select_tasks(splits["train"], stage.tasks), stage.task_weights)
    _, processor = build_policy(
        tokenizer_corpus=corpus(splits["train"]), tiny=asdict(config.model.tiny), seed=config.seed
    )
    torch.set_num_threads(config.threads or torch.get_num_threads())
    draws = [
        [train[i] for i in batch_indices(len(train), stage.batch_size, step, config.seed)]
        for step in range(steps)
    ]

    def run(cache: EncodingCache | None) -> tuple[float, list[dict]]:
        checked = []
        start = time.perf_counter()
        for step, samples in enumerate(draws):
            batch = collate_sft(samples, processor, stage.max_length, cache=cache)
            if step % args.check_every == 0:
                checked.append(batch)
        return time.perf_counter() - start, checked

    anchor_s, anchor_batches = run(None)
    cache = EncodingCache()
    ours_s, our_batches = run(cache)
    for a, b in zip(anchor_batches, our_batches, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "batches differ"

    unique = len({id(s) for samples in draws for s in samples})
    print(f"# {_provenance.machine()}, load {_provenance.load_text()}, "
          f"commit {_provenance.commit()}, {datetime.date.today()}")
    print(f"tiny-cpu SFT draws: {steps} steps x {stage.batch_size} samples = "
          f"{steps * stage.batch_size} draws of {unique} distinct samples "
          f"({len(train)} in the weighted list); {len(anchor_batches)} batches compared, equal")
    print(f"anchor (encode every draw): {anchor_s:6.1f} s, {anchor_s / steps * 1e3:5.1f} ms/step")
    print(f"ours (encoding cache):      {ours_s:6.1f} s, {ours_s / steps * 1e3:5.1f} ms/step")
    hit_rate = cache.hits / (cache.hits + cache.misses)
    print(f"ratio {anchor_s / ours_s:.2f}x; hit rate {hit_rate:.1%}; "
          f"cache holds {len(cache)} encodings in {cache.nbytes / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
