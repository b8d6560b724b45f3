"""Text rewards vs their anchors on 1,024 RSICD candidates x 5 references (CPU, single thread).

Candidates are RSICD test captions; each one's 5 references are other captions of its scene
category (``../shared/data/rsicd_test_captions.json``). Both sides get the same tokens: the
sentences are tokenized once with ``text.tokenize`` and joined with spaces, which is what
pycocoevalcap's scorers receive after its Java PTBTokenizer (not timed on either side).

Ours is timed end to end from those strings (dedup, batch tokenizer, word ids, Numba kernels) in
two states: ``cold`` clears the per-sentence tokenizer caches before every call, ``warm`` keeps
them (references seen before, as in GRPO after the first epoch). Medians of wall-clock and of
process CPU time are printed; ratios use CPU time, which stays meaningful when other processes
load the machine. Anchors: pycocoevalcap ``Bleu(4)``, ``Rouge()``, ``Cider()``; rouge-score
``score_multi`` (ROUGE-L, Porter stemmer); python-Levenshtein ``ratio`` in a loop. Calls
alternate between ours and the anchor (rotating the order) so both see the same machine load;
every score is checked against the anchor's.

    python benchmarks/bench_rewards_text.py [--repeats 15] [--anchor-repeats 5]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import Levenshtein
import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer

from geovlm.rewards import text
from geovlm.rewards._text_tokenize import ptb_tokens, rouge_tokens

ROOT = Path(__file__).resolve().parents[1]
RSICD = ROOT.parent / "shared" / "data" / "rsicd_test_captions.json"


def rsicd_batch(n_candidates: int, n_refs: int, seed: int = 0):
    groups = collections.defaultdict(list)
    for pair in json.loads(RSICD.read_text())["pairs"]:
        if "_" in pair["image_filename"]:
            groups[pair["image_filename"].rsplit("_", 1)[0]].append(pair["caption"])
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    candidates, references = [], []
    for _ in range(n_candidates):
        captions = groups[names[rng.integers(len(names))]]
        picks = rng.choice(len(captions), size=n_refs + 1, replace=False)
        candidates.append(" ".join(text.tokenize(captions[picks[0]])))
        references.append([" ".join(text.tokenize(captions[i])) for i in picks[1:]])
    return candidates, references


def machine() -> str:
    model = platform.processor() or "CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return f"{model}, {os.cpu_count()} cores"


def clear_caches() -> None:
    ptb_tokens.cache_clear()
    rouge_tokens.cache_clear()


def timed(fn, before=None):
    """(wall seconds, CPU seconds of this process, result)."""
    if before is not None:
        before()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=1024)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--anchor-repeats", type=int, default=5)
    args = parser.parse_args()

    cands, refs = rsicd_batch(args.candidates, args.refs)
    res = {i: [c] for i, c in enumerate(cands)}
    gts = {i: list(r) for i, r in enumerate(refs)}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def pairs():
        return zip(cands, refs, strict=True)

    def coco_bleu():
        with contextlib.redirect_stdout(io.StringIO()):
            return np.array(Bleu(4).compute_score(gts, res, verbose=0)[1]).T

    cases = [
        ("bleu (BLEU-1..4)", lambda: text.bleu(cands, refs), "pycocoevalcap Bleu(4)", coco_bleu),
        (
            "rouge_l",
            lambda: text.rouge_l(cands, refs),
            "pycocoevalcap Rouge",
            lambda: Rouge().compute_score(gts, res)[1],
        ),
        (
            "cider_d (corpus df)",
            lambda: text.cider_d(cands, refs),
            "pycocoevalcap Cider",
            lambda: np.asarray(Cider().compute_score(gts, res)[1]),
        ),
        (
            "rouge_l_f1 (stemmer)",
            lambda: text.rouge_l_f1(cands, refs),
            "rouge-score score_multi",
            lambda: np.array(
                [scorer.score_multi(r, c)["rougeL"].fmeasure for c, r in pairs()]
            ),
        ),
        (
            "levenshtein_ratio",
            lambda: text.levenshtein_ratio(cands, refs),
            "python-Levenshtein ratio loop",
            lambda: np.array(
                [max(Levenshtein.ratio(c, x) for x in r) for c, r in pairs()]
            ),
        ),
    ]
    for _, ours, _, _ in cases:  # compile / load the Numba cache outside the timings
        ours()

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}; "
          f"{datetime.date.today()}; commit {commit}")
    print(f"shape: {args.candidates} candidates x {args.refs} references (RSICD)\n")
    print("| metric | ours cold: wall, CPU | ours warm: wall, CPU | anchor | anchor: wall, CPU "
          "| ratio cold (CPU) | ratio warm (CPU) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ours, anchor_name, anchor in cases:
        runs = {"cold": ([], []), "warm": ([], []), "anchor": ([], [])}
        expected = got = None
        for i in range(args.repeats):
            # Rotate the order so that no variant always follows the anchor's allocations.
            order = ["anchor", "cold", "warm"] if i < args.anchor_repeats else ["cold", "warm"]
            for kind in order[i % len(order) :] + order[: i % len(order)]:
                if kind == "anchor":
                    wall, cpu, expected = timed(anchor)
                else:
                    wall, cpu, got = timed(ours, clear_caches if kind == "cold" else None)
                runs[kind][0].append(wall)
                runs[kind][1].append(cpu)
        diff = float(np.max(np.abs(np.asarray(got) - np.asarray(expected))))
        med = {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in runs.items()}
        cell = {k: f"{w * 1e3:.2f}, {c * 1e3:.2f} ms" for k, (w, c) in med.items()}
        print(
            f"| {name} | {cell['cold']} | {cell['warm']} | {anchor_name} "
            f"| {cell['anchor']} | {med['anchor'][1] / med['cold'][1]:.1f}x "
            f"| {med['anchor'][1] / med['warm'][1]:.1f}x | {diff:.1e} |"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
