"""Evaluation splits of referred detection: object size buckets.

GeoVLM-R1 reports referred-object detection separately for small, medium and large objects and
for single- and multiple-object references. The size of a reference is the mean area of its
axis-aligned boxes relative to the image area, so that the buckets mean the same on any image
size; ``SIZE_THRESHOLDS`` are the two cut points (fractions of the image area).
"""

from __future__ import annotations

SIZE_THRESHOLDS: tuple[float, float] = (0.015, 0.04)


def size_bucket(mean_area: float, image_size: tuple[int, int]) -> str:
    """``small`` / ``medium`` / ``large`` for a box area (px^2) on a ``(width, height)`` image."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    fraction = float(mean_area) / float(width * height)
    small, medium = SIZE_THRESHOLDS
    return "small" if fraction < small else "medium" if fraction < medium else "large"
