"""Drawing one token per row: inverse-CDF sampling (``geovlm.engines.builtin.sample_rows``)
against ``torch.multinomial``.

Run: ``python benchmarks/bench_sampling.py [--repeats N] [--threads T]``.

Shapes: the tiny-cpu preset's decode step (128 rows = 8 prompts x G=16, its 1,012-token
vocabulary) and a real Qwen2.5-VL's (its 151,936-token vocabulary) at 8 and 128 rows. Both draw
from the same distribution; before timing, both sample 20,000 rows of one distribution and the
two histograms must agree (a two-sample chi-square test, p > 1e-3). Reports the median time per
call and the ratio anchor / ours.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import _provenance  # benchmarks/_provenance.py: the script's directory is on sys.path
import torch
from scipy.stats import chi2_contingency

from geovlm.engines.builtin import sample_rows


def anchor(probs: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(probs, 1).squeeze(1)


def same_distribution(vocab: int) -> float:
    """p-value of a two-sample chi-square test between the two samplers' histograms."""
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 2
    probs = torch.softmax(logits, dim=-1)[None].expand(20_000, -1).contiguous()
    counts = [torch.bincount(f(probs), minlength=vocab) for f in (anchor, sample_rows)]
    table = torch.stack(counts).double()
    table = table[:, table.sum(0) >= 10]  # chi-square needs populated cells
    return float(chi2_contingency(table.numpy()).pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p_value = same_distribution(64)
    assert p_value > 1e-3, f"the samplers' histograms differ (p = {p_value:.2g})"

    print(f"# {_provenance.machine()}, load {_provenance.load_text()}, "
          f"commit {_provenance.commit()}, {datetime.date.today()}, "
          f"{torch.get_num_threads()} thread(s); same-distribution test p = {p_value:.2f}")
    print("| case | rows x vocabulary | anchor: torch.multinomial ms | ours: sample_rows ms | "
          "ratio |")
    print("|---|---|---|---|---|")
    cases = {
        "tiny-cpu decode step": (128, 1012),
        "Qwen2.5-VL vocabulary, 8 rows": (8, 151_936),
        "Qwen2.5-VL vocabulary, 128 rows": (128, 151_936),
    }
    for name, (rows, vocab) in cases.items():
        probs = torch.softmax(torch.randn(rows, vocab) * 3, dim=-1)
        times: dict[str, list[float]] = {"anchor": [], "ours": []}
        for _ in range(args.repeats):
            for side, sampler in (("anchor", anchor), ("ours", sample_rows)):
                start = time.perf_counter()
                sampler(probs)
                times[side].append(time.perf_counter() - start)
        a, b = (statistics.median(times[k]) * 1e3 for k in ("anchor", "ours"))
        print(f"| {name} | {rows} x {vocab} | {a:.3f} | {b:.3f} | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
