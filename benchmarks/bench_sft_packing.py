"""SFT packing: padding in the embedded world's SFT batches, and SFT step tokens/s padded vs packed.

Run: ``python benchmarks/bench_sft_packing.py [--batches N] [--scenes S] [--attn sdpa|eager]``.

The tiny-cpu preset's SFT stage: its tiny model (fp32 on CPU), its ``batch_size`` and
``max_length``, batches drawn from the embedded world's training split exactly as ``run_sft``
draws them (``S`` scenes; the lengths are i.i.d. per sample, so fewer scenes than the preset's
only shorten the set-up). For each of ``N`` batches and three layouts of the same samples:

* ``off``: ``collate_sft``'s right-padded batch (the anchor);
* ``auto``: what ``packing=auto`` does with SDPA/eager: rows no wider than the longest sample
  when that saves rows, else the padded batch;
* ``on``: rows of up to ``max_length`` tokens;
* ``shared``: what the stage does by default (``packing=auto`` with ``prompt_sharing``): the
  samples' common leading tokens (system turn) run once and the rests are packed, when that runs
  fewer positions (``geovlm.sft_prefix``);

it reports the padding fraction (padding tokens / tokens computed; for ``shared`` the positions
it saves count as negative padding) and the median time of one
SFT forward + backward (``token_nll_sum`` then ``backward``); tokens/s counts the real tokens,
the same in every layout. The ratio is the padded median over the layout's median (> 1: faster).
Timed batches: the first ``N`` that ``auto`` packs and the first it leaves padded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import timeit
from dataclasses import asdict

import _provenance  # benchmarks/_provenance.py: the script's directory is on sys.path
import torch

from geovlm.config import load_config
from geovlm.data.collate import collate_sft, pad_token_id
from geovlm.data.packing import sequence_lengths
from geovlm.data.sources import load_splits, select_tasks
from geovlm.data.synthetic import corpus
from geovlm.loop import batch_indices
from geovlm.model import build_policy
from geovlm.packed import pack_for_model
from geovlm.sft import model_batch, packing_capacity, token_nll_sum
from geovlm.sft_prefix import SharedPrefixBatch


def step_fn(model, batch):
    def step():
        model.zero_grad(set_to_none=True)
        nll, _ = token_nll_sum(model, batch)
        nll.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--stats-batches", type=int, default=40)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()

    config = load_config(None, [f"data.n_train_scenes={args.scenes}"])
    stage = next(s for s in config.stages if s.kind == "sft")
    splits = load_splits(config.data, config.model.box_convention)
    train = select_tasks(splits["train"], stage.tasks or config.data.tasks)
    model, processor = build_policy(
        tokenizer_corpus=corpus(splits["train"]), tiny=asdict(config.model.tiny),
        attn_implementation=args.attn, seed=config.seed,
    )
    torch.set_num_threads(config.threads or torch.get_num_threads())
    pad_id = pad_token_id(processor)

    def layout(mode: str):
        rule = dataclasses.replace(stage, packing=mode)

        def lay(batch: dict) -> dict:
            capacity = packing_capacity(model, batch, rule)
            return batch if capacity is None else pack_for_model(model, batch, capacity, pad_id)

        return lay

    def shared(batch: dict):
        return model_batch(model, batch, dataclasses.replace(stage, packing="auto"), pad_id)

    layouts = {mode: layout(mode) for mode in ("off", "auto", "on")}
    layouts["shared"] = shared

    def positions(laid) -> int:
        """Token positions the model runs (the shared prefix once)."""
        return laid.tokens() if isinstance(laid, SharedPrefixBatch) else laid["input_ids"].numel()

    def rows_of(laid) -> str:
        if isinstance(laid, SharedPrefixBatch):
            r, w = laid.rest["input_ids"].shape
            return f"{laid.prefix_length}+{r}x{w}"
        return "x".join(str(n) for n in laid["input_ids"].shape)

    def batch_at(step: int) -> dict:
        idx = batch_indices(len(train), stage.batch_size, step, config.seed)
        return collate_sft([train[i] for i in idx], processor, stage.max_length)

    print(f"# {_provenance.machine()}, load {_provenance.load_text()}, "
          f"commit {_provenance.commit()}, {datetime.date.today()}, attn={args.attn}, "
          f"batch_size={stage.batch_size}, max_length={stage.max_length}, "
          f"{len(train)} training samples")
    fractions: dict[str, list[float]] = {name: [] for name in layouts}
    rows: dict[str, list[int]] = {name: [] for name in layouts}
    for step in range(args.stats_batches):
        batch = batch_at(step)
        real = sum(sequence_lengths(batch))
        for name, layout in layouts.items():
            laid = layout(batch)
            fractions[name].append(1 - real / positions(laid))
            shared_rows = isinstance(laid, SharedPrefixBatch)
            rows[name].append((laid.rest if shared_rows else laid)["input_ids"].shape[0])
    print(f"padding over {args.stats_batches} batches: layout, mean padding fraction, mean rows")
    for name in layouts:
        print(f"  {name:6s} {statistics.mean(fractions[name]):6.1%}  "
              f"{statistics.mean(rows[name]):5.1f} rows")

    print("layout, batch, rows x width, real tokens, median ms, tokens/s, ratio vs off")
    # The first batches auto packs, and the first it leaves padded (if any).
    packs = [s for s in range(args.stats_batches) if rows["auto"][s] < rows["off"][s]]
    leaves = [s for s in range(args.stats_batches) if s not in packs]
    print(f"auto packs {len(packs)} of {args.stats_batches} batches")
    for step in packs[: args.batches] + leaves[:1]:
        batch = batch_at(step)
        real = sum(sequence_lengths(batch))
        anchor = None
        for name, layout in layouts.items():
            laid = layout(batch)
            run_step = step_fn(model, laid)
            run_step()  # warm-up: first-call allocations, the thread pool
            ms = statistics.median(timeit.repeat(run_step, number=1, repeat=args.repeats)) * 1e3
            anchor = anchor or ms
            shape = rows_of(laid)
            print(f"  {name:6s} {step}  {shape:11s} {real:6d} {ms:9.1f} "
                  f"{real / ms * 1e3:9.0f}  {anchor / ms:5.2f}")


if __name__ == "__main__":
    main()
