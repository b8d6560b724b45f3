"""The accuracy rewards' options, defined once: ``RewardChoices`` (what a run config sets) and
``RewardOptions`` (those plus what the trainer and the caller fill in).

``geovlm.config`` builds ``stages.<i>.rewards`` from ``RewardChoices`` itself, so the YAML keys and
their defaults are these fields. This module imports no numba and no torch (``import
geovlm.config`` stays light); the text kernels the names below refer to load with
``geovlm.rewards.semantic``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from geovlm.rewards.text import CiderDocumentFrequency

# Lexical metrics a caption reward may use: names of ``geovlm.rewards.text`` functions
# (``semantic.LEXICAL_METRICS`` maps each name to its function).
LEXICAL_METRIC_NAMES: tuple[str, ...] = (
    "rouge_l_f1",
    "rouge_1_f1",
    "rouge_l",
    "levenshtein_ratio",
    "token_jaccard",
    "cider_d_reward",
)


@dataclass(frozen=True)
class RewardChoices:
    """The reward choices of a GRPO stage (``stages.<i>.rewards.*``). Defaults follow GeoVLM-R1
    except where its reward can be gamed (``box_credit``, ``multilabel``, ``grounding``,
    ``caption_guard``: see ``docs/rewards.md``); the paper's variant is a value of each.

    Attributes:
        rotated_iou: ``"hbb"`` scores rotated boxes with the paper's axis-aligned IoU on each
            box's axis-aligned hull; ``"rotated"`` with the exact IoU of the rotated rectangles.
        referred_reward: ``"multibox"`` (the optimal one-to-one matching of all boxes, equal to
            the IoU credit for one box each) or ``"first_box"`` (the first predicted and first
            true box).
        box_credit: ``"above_chance"`` scores a matched box by its IoU above that of the
            whole-image box (if it reaches ``min_box_iou``) and lets every box beyond the true count
            cancel one matched box; ``"iou"`` by its IoU, with extra boxes only in the divisor
            (the paper's).
        min_box_iou: with ``"above_chance"``, the IoU a box must reach to earn anything (a
            gate: the credit of the IoUs it passes is unchanged). A box ``k`` times an object's
            area around it reaches IoU ``1 / k``: without a gate a policy that cannot localise
            learns to hedge with one large central box (measured in benchmarks/RESULTS.md, "A
            fifth look"). 0.3 pays nothing for boxes over 3.3 times the object's area.
        multilabel: ``"informedness"`` (true minus false positive rate), ``"f1"``, or
            ``"recall"`` (the paper's; listing every class maximises it).
        counting: ``"exact"`` or ``"smooth"`` (see the counting task's accuracy).
        vqa: ``"jaccard"`` (token-set Jaccard) or ``"exact"`` (normalised match) for open answers.
        caption_metric: ``"levenshtein"`` (the paper's image-captioning reward) or ``"cider_d"``.
        use_embeddings: region / change captioning use the hybrid embedding + lexical reward;
            ``False`` scores them with the lexical metric alone (no torch, no model load).
        semantic_weight: weight of the embedding similarity in the hybrid caption reward.
        lexical: the lexical metric of the hybrid and grounding rewards
            (one of ``LEXICAL_METRIC_NAMES``).
        grounding_text_weight: weight of the lexical score in the grounding-description reward.
        grounding: ``"gated"`` scales the whole grounding reward by the box credit, so text
            without a matching box earns nothing; ``"sum"`` adds the weighted box and text scores
            (the paper's).
        caption_guard: scale every caption-like reward by ``rewards.caption_guard`` (less for
            answers longer than the references: concatenations, repetitions, word bags; nothing
            for a caption without a content word); ``False`` is the paper's raw metric.
    """

    rotated_iou: Literal["hbb", "rotated"] = "hbb"
    referred_reward: Literal["multibox", "first_box"] = "multibox"
    box_credit: Literal["above_chance", "iou"] = "above_chance"
    min_box_iou: float = 0.3
    multilabel: Literal["informedness", "f1", "recall"] = "informedness"
    counting: Literal["exact", "smooth"] = "exact"
    vqa: Literal["jaccard", "exact"] = "jaccard"
    caption_metric: Literal["levenshtein", "cider_d"] = "levenshtein"
    use_embeddings: bool = True
    semantic_weight: float = 0.5
    lexical: str = "rouge_l_f1"
    grounding_text_weight: float = 0.5
    grounding: Literal["gated", "sum"] = "gated"
    caption_guard: bool = True


# The allowed values of every Literal choice, read off the annotations above.
_CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(hint)
    for name, hint in get_type_hints(RewardChoices).items()
    if get_origin(hint) is Literal
}
_CHOICES["lexical"] = LEXICAL_METRIC_NAMES


@dataclass(frozen=True)
class RewardOptions(RewardChoices):
    """Every choice of the accuracy rewards: the ``RewardChoices`` plus

    Attributes:
        convention: the box convention of the model's answers (``geovlm.data.boxes``).
        min_pixels, max_pixels: the Qwen2.5-VL processor's pixel budget, which fixes the resized
            input size that ``"qwen25vl"`` boxes are relative to (``None``: processor defaults).
        synonyms: extra synonym groups for class names (``parse.SYNONYM_GROUPS`` always apply).
        embedding_device: the torch device of the sentence-embedding model.
        max_pred_boxes: predicted boxes matched per answer (more still count as extras).
        cider_document_frequency: the idf table of the ``"cider_d"`` caption reward.
    """

    convention: str = "qwen25vl"
    min_pixels: int | None = None
    max_pixels: int | None = None
    synonyms: tuple[tuple[str, ...], ...] = ()
    embedding_device: str = "cpu"
    max_pred_boxes: int = 100
    cider_document_frequency: CiderDocumentFrequency | None = None

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RewardOptions.{name}={getattr(self, name)!r}; one of {allowed}")
        for name in ("semantic_weight", "grounding_text_weight", "min_box_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"RewardOptions.{name} must lie in [0, 1]")
        if int(self.max_pred_boxes) != self.max_pred_boxes or self.max_pred_boxes < 1:
            raise ValueError("RewardOptions.max_pred_boxes must be a positive integer")
