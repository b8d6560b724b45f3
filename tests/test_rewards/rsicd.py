"""Real RSICD captions for the text-metric tests (``tests/fixtures/rsicd_test_captions.json``)."""

from __future__ import annotations

import collections
import json
import secrets
from pathlib import Path

import numpy as np

RSICD = Path(__file__).resolve().parents[1] / "fixtures" / "rsicd_test_captions.json"


def captions_by_category() -> dict[str, list[str]]:
    """RSICD test captions grouped by scene category (the image name's prefix)."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for pair in json.loads(RSICD.read_text())["pairs"]:
        name = pair["image_filename"]
        if "_" in name:
            groups[name.rsplit("_", 1)[0]].append(pair["caption"])
    return groups


def sample_batch(
    n: int, max_references: int, groups: dict[str, list[str]] | None = None
) -> tuple[int, list[str], list[list[str]]]:
    """``n`` fresh random candidates, each against 1..``max_references`` other captions of its
    category; returns the seed too so that a failure can be replayed."""
    groups = groups if groups is not None else captions_by_category()
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    candidates, references = [], []
    for _ in range(n):
        captions = groups[names[rng.integers(len(names))]]
        size = 1 + rng.integers(1, max_references + 1)
        picks = rng.choice(len(captions), size=size, replace=False)
        candidates.append(captions[picks[0]])
        references.append([captions[i] for i in picks[1:]])
    return seed, candidates, references
