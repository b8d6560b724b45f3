"""Benchmark the embedded EO world against the real-data path for the same samples.

Ours: ``embedded_splits`` generating N scenes (two rendered 112x112 images each) and one sample
per task family from each (13 per scene). Anchor: the same samples written once as VLM-R1 JSONL
plus PNG files, then read back with ``read_samples`` and every image decoded (``load_images``),
i.e. what a real dataset of that size costs to load. Both measured in the same run.

Run: ``python benchmarks/bench_data.py [--scenes 154] [--repeats 3]``. Prints the median and
minimum seconds of each and the ratio ours / anchor (the minimum shows the uncontended cost when
other processes share the cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from geovlm.data.readers import read_samples
from geovlm.data.synthetic import embedded_splits


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=154)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    def ours():
        return embedded_splits(seed=0, n_train=args.scenes, n_val=0, n_test=0)["train"]

    samples = ours()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(samples, Path(tmp))
        read_samples(path)  # warm: qwen_vl_utils import, file cache

        def anchor():
            for sample in read_samples(path):
                sample.load_images()

        ours_med, ours_min = timed(ours, args.repeats)
        anchor_med, anchor_min = timed(anchor, args.repeats)
    print(f"samples: {len(samples)} from {args.scenes} scenes (112x112, 13 tasks)")
    print("| case | ours median (min) s | anchor median (min) s | ratio |")
    print(
        f"| generate vs read+decode | {ours_med:.3f} ({ours_min:.3f}) | "
        f"{anchor_med:.3f} ({anchor_min:.3f}) | {ours_med / anchor_med:.2f} |"
    )


if __name__ == "__main__":
    main()
