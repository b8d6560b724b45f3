"""change_caption: change captioning on a bi-temporal pair, a sentence about what changed.

* parse / accuracy: the answer sentence, scored by the hybrid embedding + lexical reward.
* metrics: as image captioning (ROUGE, METEOR, BLEU, CIDEr); headline ``rouge_l``.
* records: the answer is the first reference; ``captions`` / ``references`` add more.
"""

from __future__ import annotations

from geovlm import earthdial_metrics
from geovlm.data.schema import Target
from geovlm.data.synthetic import (
    COVER_PLACE,
    SceneContext,
    change_summary,
    colored_inventory,
    inventory,
    objects_phrase,
    was_were,
)
from geovlm.tasks._captions import caption_target, hybrid_caption_accuracy, parse_caption
from geovlm.tasks.image_caption import full_caption_metrics
from geovlm.tasks.spec import TaskSpec

_COVER_CHANGE = {
    ("forest", "bare land"): "the forest was cleared",
    ("forest", "farmland"): "the forest was turned into fields",
    ("farmland", "bare land"): "the fields were left bare",
    ("farmland", "urban"): "the fields were built over",
    ("bare land", "urban"): "the bare land was built up",
}


def _change_references(ctx: SceneContext) -> tuple[str, ...]:
    scene = ctx.scene
    if scene.change == "no change":
        return ("nothing has changed", "the two images show the same scene", "there is no change")
    if scene.change == "land cover change":
        old, new = scene.before.land_cover, scene.after.land_cover
        return (f"the {old} changed to {new}", f"{old} became {new}", _COVER_CHANGE[(old, new)])
    if scene.change == "objects added":
        changed = [o for o in scene.after.objects if o not in scene.before.objects]
        verb, verb2, where = "added", "appeared", COVER_PLACE[ctx.cover]
    else:
        changed = [o for o in scene.before.objects if o not in scene.after.objects]
        verb, verb2, where = "removed", "disappeared", "from the scene"
    n = len(changed)
    return (
        f"{inventory(changed, digits=False)} {was_were(n)} {verb}",
        f"{colored_inventory(changed)} {verb2}",
        f"{objects_phrase(n)} {verb2} {where}",
    )


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """Three descriptions of the scene's change."""
    references = _change_references(ctx)
    target = ctx.target(references[0], captions=references, meta={"change": ctx.scene.change})
    return ctx.prompt(), change_summary(ctx), target


CHANGE_CAPTION = TaskSpec(
    name="change_caption",
    description="change captioning on a bi-temporal pair: a sentence about what changed",
    parse=parse_caption,
    accuracy=hybrid_caption_accuracy,
    metrics={
        "geovlm": full_caption_metrics,
        "earthdial": earthdial_metrics.caption_metrics,
    },
    headline="rouge_l",
    prompts={
        "default": (
            "Describe the change between the two images.",
            "What changed between the images?",
        )
    },
    generate=generate,
    from_record=caption_target,
    aliases=("change_captioning",),
    bitemporal=True,
)

SPECS = (CHANGE_CAPTION,)
