"""The embedded EO world against the real-data path for the same samples.

Ours: ``embedded_splits`` generating ``SCENES`` scenes (two rendered 112x112 images each) and one
sample per task family from each (13 per scene). Anchor: the same samples written once as
VLM-R1 JSONL plus PNG files, then read back with ``read_samples`` and every image decoded
(``Sample.load_images``), i.e. what a real dataset of that size costs to load. Both must yield
the same samples (ids, tasks, prompts, responses, image pixels) before they are timed.

pytest-benchmark group (``make bench``, or ``pytest benchmarks/bench_data.py``): ``embedded world``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from _compare import Case, anchor, equal, ours, time_method

from geovlm.data.readers import read_samples
from geovlm.data.synthetic import embedded_splits

SCENES = 40


def write_jsonl(samples, folder: Path) -> Path:
    """The samples as a VLM-R1 JSONL file with their images as PNGs under ``folder``."""
    names: dict[int, str] = {}
    lines = []
    for sample in samples:
        paths = []
        for image in sample.images:
            if id(image) not in names:
                names[id(image)] = f"{len(names)}.png"
                image.save(folder / names[id(image)])
            paths.append(names[id(image)])
        record = {
            "id": sample.id,
            "image": paths if len(paths) > 1 else paths[0],
            "problem": sample.prompt,
            "solution": sample.response,
            "task": sample.task,
            "captions": list(sample.target.captions),
        }
        lines.append(json.dumps(record))
    path = folder / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def generate():
    return embedded_splits(seed=0, n_train=SCENES, n_val=0, n_test=0)["train"]


def read_and_decode(path: Path):
    return [dataclasses.replace(s, images=s.load_images()) for s in read_samples(path)]


def content(samples) -> list[tuple]:
    """What must survive the round trip: ids, tasks, texts and every image's RGB pixels."""
    return [(s.id, s.task, s.prompt, s.response,
             tuple(image.convert("RGB").tobytes() for image in s.images)) for s in samples]


@pytest.fixture(scope="module")
def embedded_world(tmp_path_factory):
    path = write_jsonl(generate(), tmp_path_factory.mktemp("embedded_world"))
    read_samples(path)  # qwen_vl_utils import, file cache: not the anchor's cost
    n = sum(1 for _ in path.open())
    return Case("embedded world: generate vs read + decode",
                f"{SCENES} scenes, {n:,} samples, 112x112", {
                    "ours": ours(generate),
                    "VLM-R1 JSONL + PNG read + decode": anchor(lambda: read_and_decode(path)),
                }, equal(content))


@pytest.mark.parametrize("method", ["ours", "VLM-R1 JSONL + PNG read + decode"])
def test_embedded_world(benchmark, embedded_world, method):
    time_method(benchmark, embedded_world, method)
