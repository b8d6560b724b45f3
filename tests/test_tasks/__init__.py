"""Tests of geovlm/tasks."""

# The GeoVLM-R1 task families of the paper's Table 1, in its order: the built-in registry.
PAPER_TASKS = (
    "scene_cls",
    "multilabel_cls",
    "referred_det",
    "referred_det_rot",
    "multi_det",
    "counting",
    "vqa",
    "region_caption",
    "grounding_desc",
    "image_caption",
    "change_det",
    "change_caption",
    "temporal_cls",
)
