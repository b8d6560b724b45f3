"""SFT steps with the frozen tower's per-image cache against running the tower every step.

Run: ``python benchmarks/bench_vision_cache.py [--steps N]``.

The tiny-cpu preset's SFT stage on its embedded training split: its model (built, tower
frozen as ``model.freeze_vision`` leaves it), its task weights, batch size and the batches
``run_sft`` draws in its first ``N`` steps, each collated once up front. Anchor: forward +
backward of every batch (``model_batch``, ``token_nll_sum``) with the tower run on every image.
Ours: the same steps with ``cache_frozen_vision`` installed on a fresh cache, so its first
encodings are paid here too. No optimizer step: both sides compute the same losses, which must
be equal bitwise. Reports total seconds, the ratio, and the cache's hit rate.
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import asdict

import _provenance  # benchmarks/_provenance.py: the script's directory is on sys.path
import torch

from geovlm.config import load_config
from geovlm.data.collate import collate_sft, pad_token_id
from geovlm.data.sources import load_splits, select_tasks, weigh_tasks
from geovlm.data.synthetic import corpus
from geovlm.loop import batch_indices
from geovlm.model import build_policy
from geovlm.sft import model_batch, token_nll_sum
from geovlm.vision_cache import cache_frozen_vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    config = load_config(None, [])
    stage = next(s for s in config.stages if s.kind == "sft")
    splits = load_splits(config.data, config.model.box_convention)
    train = weigh_tasks(select_tasks(splits["train"], stage.tasks), stage.task_weights)
    model, processor = build_policy(
        tokenizer_corpus=corpus(splits["train"]), tiny=asdict(config.model.tiny),
        seed=config.seed, freeze_vision=True,
    )
    torch.set_num_threads(config.threads or torch.get_num_threads())
    pad_id = pad_token_id(processor)
    batches = [
        model_batch(model, collate_sft([train[i] for i in batch_indices(
            len(train), stage.batch_size, step, config.seed)], processor, stage.max_length),
            stage, pad_id, False)
        for step in range(args.steps)
    ]

    def run() -> tuple[float, list[float]]:
        losses = []
        start = time.perf_counter()
        for batch in batches:
            model.zero_grad(set_to_none=True)
            nll, _ = token_nll_sum(model, batch)
            nll.backward()
            losses.append(nll.item())
        return time.perf_counter() - start, losses

    run()  # warm-up: allocations, the thread pool (uncached)
    anchor_s, anchor_losses = run()
    cache_frozen_vision(model)
    ours_s, our_losses = run()
    assert anchor_losses == our_losses, "losses differ"
    cache = model.model.visual.forward
    images = cache.hits + cache.misses
    print(f"# {_provenance.machine()}, load {_provenance.load_text()}, "
          f"commit {_provenance.commit()}, {datetime.date.today()}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"tiny-cpu SFT, {args.steps} steps x {stage.batch_size} samples ({images} images), "
          "forward + backward; losses equal bitwise")
    sides = (("anchor (tower every step)", anchor_s), ("ours (per-image cache)", ours_s))
    for name, seconds in sides:
        print(f"{name:26s} {seconds:6.1f} s, {seconds / args.steps * 1e3:5.1f} ms/step")
    print(f"ratio {anchor_s / ours_s:.2f}x; hit rate {cache.hits / images:.1%}")


if __name__ == "__main__":
    main()
