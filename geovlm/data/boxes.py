"""Box conventions at the edges of the project, and their conversion to pixels.

Inside the project a box is float64 pixels of the original image (``xyxy`` ``[K, 4]`` or rotated
``cx, cy, w, h, angle_deg`` ``[K, 5]``, counter-clockwise). Datasets and models speak other
conventions, converted here and only here:

* ``"pixels"``   — absolute pixels of the original image (identity).
* ``"qwen2vl"``  — integers on 0..1000 of each image side (Qwen2-VL's grounding format).
* ``"qwen25vl"`` — absolute pixels of the *resized* model input (Qwen2.5-VL); the resized size is
  ``qwen_vl_utils.smart_resize`` of the original with the processor's pixel budget.
* ``"geochat"``  — 0..100 of each side: GeoChat's ``{<x1><y1><x2><y2>|<θ>}`` and the bracketed
  ``[[x1, y1, x2, y2, θ]]`` of EarthDial's and GeoChat's benchmark files (θ in degrees, read as
  counter-clockwise).

Four numbers are always ``x1, y1, x2, y2``. Five numbers follow a *layout* (``LAYOUTS``):

* ``"corners"`` — ``x1, y1, x2, y2, θ``: the corners of the unrotated box, then its rotation
  (GeoChat, EarthDial; the default of ``"geochat"``);
* ``"centre"``  — ``cx, cy, w, h, θ`` (the project's own rotated rows; the default of the other
  conventions);
* ``"xyxy"``    — axis-aligned boxes only: five numbers are an error.

For rotated boxes the centre and side lengths are scaled per axis; under anisotropic scaling
(width and height scaled differently) this is the usual approximation all three conventions make.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np

Convention = Literal["pixels", "qwen2vl", "qwen25vl", "geochat"]
CONVENTIONS: tuple[str, ...] = ("pixels", "qwen2vl", "qwen25vl", "geochat")
Layout = Literal["corners", "centre", "xyxy"]
LAYOUTS: tuple[str, ...] = ("corners", "centre", "xyxy")

# Qwen2.5-VL's patch (14) times its spatial merge (2): resized sides are multiples of this.
QWEN_RESIZE_FACTOR = 28


def smart_resize(
    height: int, width: int, factor: int = QWEN_RESIZE_FACTOR, min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16384 * 28 * 28,
) -> tuple[int, int]:
    """``(height, width)`` Qwen2-VL / Qwen2.5-VL's processors resize an image to.

    Both sides become multiples of ``factor`` (rounded), then the area is scaled into
    ``[min_pixels, max_pixels]`` keeping the aspect ratio. Same rule as ``qwen_vl_utils``, in plain
    Python so that parsing boxes never imports torch (tests check the two agree).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen25vl_resized_size(
    image_size: tuple[int, int], min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28
) -> tuple[int, int]:
    """``(width, height)`` of the model input Qwen2.5-VL's processor makes of an image."""
    width, height = image_size
    h_bar, w_bar = smart_resize(height, width, QWEN_RESIZE_FACTOR, min_pixels, max_pixels)
    return w_bar, h_bar


def saved_pixel_budget(directory: str | Path) -> tuple[int | None, int | None]:
    """``(min_pixels, max_pixels)`` of the image processor saved in a model directory.

    transformers 5 saves ``processor_config.json`` with an ``image_processor`` section, older
    checkpoints ``preprocessor_config.json``; the budget is ``size.shortest_edge`` /
    ``size.longest_edge`` or the legacy ``min_pixels`` / ``max_pixels``, as the processor reads it
    back. ``(None, None)`` when neither file gives one; an unreadable file is a ``ValueError``
    naming it.
    """
    for name, section in (("processor_config.json", "image_processor"),
                          ("preprocessor_config.json", None)):
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from err
        config = config.get(section, {}) if section and isinstance(config, dict) else config
        if not isinstance(config, dict):
            continue
        size = config.get("size") if isinstance(config.get("size"), dict) else {}
        low = size.get("shortest_edge", config.get("min_pixels"))
        high = size.get("longest_edge", config.get("max_pixels"))
        if low is not None or high is not None:
            return low, high
    return None, None


def _scale(
    convention: str, image_size: tuple[int, int], resized_size: tuple[int, int] | None
) -> tuple[float, float]:
    """Pixels of the original image per unit of ``convention``, along x and y."""
    width, height = image_size
    if convention == "pixels":
        return 1.0, 1.0
    if convention == "qwen2vl":
        return width / 1000.0, height / 1000.0
    if convention == "geochat":
        return width / 100.0, height / 100.0
    if convention == "qwen25vl":
        rw, rh = resized_size if resized_size is not None else qwen25vl_resized_size(image_size)
        return width / rw, height / rh
    raise ValueError(f"unknown box convention {convention!r}; known: {CONVENTIONS}")


def _as_boxes(boxes) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] not in (4, 5):
        raise ValueError(f"boxes must be [K, 4] xyxy or [K, 5] rotated, got shape {arr.shape}")
    return arr


def default_layout(convention: str) -> str:
    """The layout of five-number boxes in ``convention``: GeoChat's corners for ``"geochat"``,
    the centre form otherwise."""
    return "corners" if convention == "geochat" else "centre"


def _layout(layout: str | None, convention: str, width: int) -> str:
    layout = default_layout(convention) if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown box layout {layout!r}; known: {LAYOUTS}")
    if layout == "xyxy" and width == 5:
        raise ValueError("box layout 'xyxy' takes four numbers x1, y1, x2, y2, got five")
    return layout


def _convert_rotated_from_corners(arr: np.ndarray) -> np.ndarray:
    """GeoChat's rotated boxes: corners of the unrotated box plus θ -> cx, cy, w, h, θ."""
    x1, y1, x2, y2, theta = arr.T
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    return np.stack([centre_x, centre_y, np.abs(x2 - x1), np.abs(y2 - y1), theta], axis=1)


def _convert_rotated_to_corners(arr: np.ndarray) -> np.ndarray:
    cx, cy, w, h, theta = arr.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, theta], axis=1)


def to_pixels(
    boxes,
    convention: Convention,
    image_size: tuple[int, int],
    resized_size: tuple[int, int] | None = None,
    layout: Layout | None = None,
) -> np.ndarray:
    """Convert ``[K, 4]`` xyxy or ``[K, 5]`` rotated boxes from ``convention`` to original pixels.

    Five columns are read in ``layout`` (default ``default_layout(convention)``: ``x1, y1, x2, y2,
    θ`` for ``"geochat"``, ``cx, cy, w, h, θ`` otherwise) and come back as ``cx, cy, w, h, θ``.
    """
    arr = _as_boxes(boxes).copy()
    sx, sy = _scale(convention, image_size, resized_size)
    if arr.shape[1] == 5 and _layout(layout, convention, 5) == "corners":
        arr = _convert_rotated_from_corners(arr)
    arr[:, [0, 2]] *= sx
    arr[:, [1, 3]] *= sy
    return arr


def from_pixels(
    boxes,
    convention: Convention,
    image_size: tuple[int, int],
    resized_size: tuple[int, int] | None = None,
    layout: Layout | None = None,
) -> np.ndarray:
    """Inverse of ``to_pixels``: original pixels -> ``convention`` (floats, not rounded), five
    columns in ``layout``."""
    arr = _as_boxes(boxes).copy()
    sx, sy = _scale(convention, image_size, resized_size)
    arr[:, [0, 2]] /= sx
    arr[:, [1, 3]] /= sy
    if arr.shape[1] == 5 and _layout(layout, convention, 5) == "corners":
        arr = _convert_rotated_to_corners(arr)
    return arr


def render_box(box, convention: Convention) -> str:
    """One box, already in ``convention`` units, as the text a model reads and writes.

    ``[x1, y1, x2, y2]`` / ``[cx, cy, w, h, angle]`` integers for the Qwen conventions and pixels,
    ``{<x1><y1><x2><y2>|<θ>}`` for GeoChat. Values are rounded half to even (Python's ``round``).
    """
    raw = np.asarray(box, dtype=np.float64).ravel()
    if not np.all(np.isfinite(raw)):
        raise ValueError(f"cannot render a box with non-finite values: {raw.tolist()}")
    values = [int(round(float(v))) for v in raw]
    if convention == "geochat":
        corners = "".join(f"<{v}>" for v in values[:4])
        return "{" + corners + (f"|<{values[4]}>" if len(values) == 5 else "") + "}"
    return "[" + ", ".join(str(v) for v in values) + "]"
