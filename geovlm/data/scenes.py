"""The embedded Earth-observation world: seeded aerial-looking scenes and their ground truth.

A scene is a bi-temporal pair of small RGB images (default 112x112 px, a multiple of 28 so that
Qwen2.5-VL's resized input equals the original) of one land cover (water, farmland, forest, bare
land, urban) with a few objects (ship, plane, storage tank, building, vehicle) on it, and the
exact geometry of every object:

* ``SceneObject.rbox``  — the tight rotated box ``cx, cy, w, h, angle`` (float pixels, ``w >= h``,
  angle in degrees counter-clockwise *as seen on the image*, in ``[0, 180)``, or ``[0, 90)`` for
  a square box): the object's long axis points along ``(cos a, -sin a)`` in image coordinates
  (x right, y down).
* ``SceneObject.xyxy``  — the tight axis-aligned box ``x1, y1, x2, y2`` of the drawn shape.

Pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``; shapes are rasterised by Pillow, so a drawn
object's pixels lie within one pixel of its continuous boxes.

The "after" image of a pair shows the same scene with objects added, objects removed, the land
cover changed, or nothing changed but the illumination and sensor noise (``CHANGE_KINDS``).
Everything is numpy + Pillow and deterministic in ``(seed, index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

LAND_COVERS: tuple[str, ...] = ("water", "farmland", "forest", "bare land", "urban")
OBJECT_CLASSES: tuple[str, ...] = ("ship", "plane", "storage tank", "building", "vehicle")
PLURALS: dict[str, str] = {c: c + "s" for c in OBJECT_CLASSES}
CHANGE_KINDS: tuple[str, ...] = (
    "no change",
    "objects added",
    "objects removed",
    "land cover change",
)

# Which objects stand on which land cover. Land-cover transitions keep every object valid.
ALLOWED_CLASSES: dict[str, tuple[str, ...]] = {
    "water": ("ship",),
    "farmland": ("storage tank", "building", "vehicle"),
    "forest": ("building", "vehicle"),
    "bare land": ("plane", "storage tank", "building", "vehicle"),
    "urban": ("plane", "storage tank", "building", "vehicle"),
}
LAND_COVER_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "water": (),
    "farmland": ("bare land", "urban"),
    "forest": ("bare land", "farmland"),
    "bare land": ("urban",),
    "urban": (),
}

# Object colours by class; the same colour name may be a different shade on different classes
# (a red roof is not a red car). Colours too close to a land cover's own are forbidden there.
OBJECT_COLORS: dict[str, dict[str, tuple[int, int, int]]] = {
    "ship": {"white": (238, 238, 232), "gray": (150, 152, 158), "red": (196, 44, 38)},
    "plane": {"white": (244, 244, 244), "gray": (160, 162, 168)},
    "storage tank": {"white": (236, 236, 228), "gray": (168, 168, 172)},
    "building": {"red": (176, 72, 52), "white": (226, 224, 216), "blue": (62, 92, 168)},
    "vehicle": {
        "red": (222, 32, 32),
        "blue": (36, 72, 222),
        "yellow": (244, 212, 28),
        "white": (250, 250, 250),
    },
}
FORBIDDEN_COLORS: dict[str, tuple[str, ...]] = {
    "water": ("blue",),
    "farmland": (),
    "forest": (),
    "bare land": (),
    "urban": ("gray",),
}

# Shape sizes in pixels, (low, high) of the long side and of the short side (or span for planes).
SIZES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "ship": ((16.0, 28.0), (7.0, 9.0)),
    "plane": ((16.0, 24.0), (0.85, 1.05)),  # span as a fraction of the length
    "storage tank": ((9.0, 16.0), (1.0, 1.0)),  # diameter
    "building": ((13.0, 22.0), (11.0, 18.0)),
    "vehicle": ((9.0, 12.0), (6.0, 7.5)),
}

MAX_OBJECTS = 6  # objects per scene (fewer when no room is left)
_MIN_SIDE = 56
_PLACEMENT_TRIES = 40
_SCENE_TRIES = 50  # redraws of a scene's objects before its settings are called impossible
_GAP = 3.0  # minimum free space between two objects' boxes, so that they never touch


@dataclass(frozen=True)
class WorldSettings:
    """How hard the world makes detection: ``object_scale`` multiplies every object's size
    (``SIZES``: length and width; a plane's span and a tank's roundness stay proportional), and a
    scene holds at most ``max_objects`` objects (at least 2: an "objects added" pair needs one
    object before and one added). The defaults are the world the tests and benchmarks know; the
    same ``(seed, index)`` gives another scene under other settings."""

    object_scale: float = 1.0
    max_objects: int = MAX_OBJECTS

    def __post_init__(self) -> None:
        if not (isinstance(self.object_scale, (int, float)) and 0 < self.object_scale <= 4):
            raise ValueError(f"object_scale must be in (0, 4], got {self.object_scale!r}")
        if not (isinstance(self.max_objects, (int, np.integer)) and 2 <= self.max_objects <= 12):
            raise ValueError(f"max_objects must be an int in [2, 12], got {self.max_objects!r}")


DEFAULT_WORLD = WorldSettings()


@dataclass(frozen=True)
class SceneObject:
    """One object: its class, colour name, pose and the boxes that follow from its shape."""

    category: str
    color: str
    cx: float
    cy: float
    length: float
    width: float
    heading: float  # degrees counter-clockwise of the object's front (ship bow, plane nose)
    rbox: tuple[float, float, float, float, float]
    xyxy: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        """Area of the axis-aligned box, in square pixels."""
        x1, y1, x2, y2 = self.xyxy
        return (x2 - x1) * (y2 - y1)


@dataclass(frozen=True)
class SceneState:
    """What one image of a pair shows."""

    land_cover: str
    objects: tuple[SceneObject, ...]
    image: Image.Image


@dataclass(frozen=True)
class Scene:
    """A bi-temporal scene: ``before`` is the image every single-image task uses."""

    id: str
    seed: tuple[int, int]
    image_size: tuple[int, int]
    before: SceneState
    after: SceneState
    change: str
    background_seed: int
    after_noise_seed: int
    after_gain: float

    def unchanged_after(self) -> SceneState:
        """What the second image would show had nothing changed: the first image's land cover and
        objects under the second image's illumination and sensor noise (``after`` itself for a
        "no change" scene). Rendered on demand: a change-detection sample may pair it with
        ``before`` as a no-change pair."""
        if self.change == "no change":
            return self.after
        cover, objects = self.before.land_cover, self.before.objects
        image = render(
            cover,
            objects,
            self.image_size,
            self.background_seed,
            self.after_noise_seed,
            self.after_gain,
        )
        return SceneState(cover, objects, image)


def _rotate(points: np.ndarray, cx: float, cy: float, angle_deg: float) -> np.ndarray:
    """Local ``[K, 2]`` points (x along the object's front) -> image coordinates (y down)."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    x, y = points[:, 0], points[:, 1]
    return np.stack([cx + x * c + y * s, cy - x * s + y * c], axis=1)


def _circle(radius: float, n: int = 32) -> np.ndarray:
    t = np.arange(n) * (2 * math.pi / n)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _shape_parts(category: str, length: float, width: float) -> list[tuple[np.ndarray, float]]:
    """Local polygons of a shape and the brightness factor each is painted with.

    The first part is the outline every later part lies inside of (the plane's are unioned), so
    the shape's extent is the extent of all parts.
    """
    half_l, half_w = length / 2, width / 2
    if category == "ship":
        bow = min(width, length / 3)
        hull = np.array(
            [
                [-half_l, -half_w],
                [half_l - bow, -half_w],
                [half_l, 0.0],
                [half_l - bow, half_w],
                [-half_l, half_w],
            ]
        )
        bridge = _rect(-half_l + 2, -half_w * 0.5, -half_l + 2 + length * 0.22, half_w * 0.5)
        return [(hull, 1.0), (bridge, 0.72)]
    if category == "plane":
        body = max(1.6, length / 11)
        fuselage = np.array(
            [
                [-half_l, -body],
                [half_l - 2 * body, -body],
                [half_l, 0.0],
                [half_l - 2 * body, body],
                [-half_l, body],
            ]
        )
        chord, sweep, x_wing = length * 0.2, length * 0.16, length * 0.08
        wing = np.array(
            [
                [x_wing + chord / 2, 0.0],
                [x_wing - sweep + chord / 4, -half_w],
                [x_wing - sweep - chord / 4, -half_w],
                [x_wing - chord / 2, 0.0],
                [x_wing - sweep - chord / 4, half_w],
                [x_wing - sweep + chord / 4, half_w],
            ]
        )
        tail_span, tail_chord = width * 0.2, length * 0.12
        tail = np.array(
            [
                [-half_l + tail_chord * 1.6, 0.0],
                [-half_l + tail_chord * 0.4, -tail_span],
                [-half_l, -tail_span],
                [-half_l, tail_span],
                [-half_l + tail_chord * 0.4, tail_span],
            ]
        )
        return [(fuselage, 1.0), (wing, 1.0), (tail, 1.0)]
    if category == "storage tank":
        return [(_circle(half_l), 1.0), (_circle(half_l * 0.72), 0.86), (_circle(1.2, 8), 0.6)]
    if category == "building":
        body = _rect(-half_l, -half_w, half_l, half_w)
        shaded = _rect(-half_l, 0.0, half_l, half_w)
        ridge = _rect(-half_l + 1, -0.5, half_l - 1, 0.5)
        return [(body, 1.0), (shaded, 0.78), (ridge, 0.6)]
    if category == "vehicle":
        body = _rect(-half_l, -half_w, half_l, half_w)
        windshield = _rect(half_l - length * 0.38, -half_w + 1, half_l - length * 0.2, half_w - 1)
        return [(body, 1.0), (windshield, 0.35)]
    raise ValueError(f"unknown object class {category!r}; known: {OBJECT_CLASSES}")


def _canonical_rbox(
    cx: float, cy: float, w: float, h: float, angle: float
) -> tuple[float, float, float, float, float]:
    """One representative of the rotated box's equivalence class: ``w >= h``, angle in a period."""
    if h > w:
        w, h, angle = h, w, angle + 90.0
    period = 90.0 if w == h else 180.0
    return (cx, cy, w, h, float(angle % period))


def make_object(
    category: str, color: str, cx: float, cy: float, length: float, width: float, heading: float
) -> SceneObject:
    """An object with its boxes computed from its drawn shape."""
    if color not in OBJECT_COLORS.get(category, {}):
        raise ValueError(f"no colour {color!r} for {category!r}")
    local = np.concatenate([points for points, _ in _shape_parts(category, length, width)])
    (lx0, ly0), (lx1, ly1) = local.min(axis=0), local.max(axis=0)
    center = _rotate(np.array([[(lx0 + lx1) / 2, (ly0 + ly1) / 2]]), cx, cy, heading)[0]
    angle = 0.0 if category == "storage tank" else heading
    rbox = _canonical_rbox(float(center[0]), float(center[1]), lx1 - lx0, ly1 - ly0, angle)
    world = _rotate(local, cx, cy, heading)
    (x1, y1), (x2, y2) = world.min(axis=0), world.max(axis=0)
    return SceneObject(
        category,
        color,
        cx,
        cy,
        length,
        width,
        heading % 360.0,
        rbox,
        (float(x1), float(y1), float(x2), float(y2)),
    )


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a coarse random grid bilinearly upsampled to ``shape``."""
    height, width = shape
    grid = rng.uniform(-1.0, 1.0, (int(height / cell) + 2, int(width / cell) + 2))
    image = Image.fromarray(grid.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def _background(land_cover: str, size: tuple[int, int], seed: int) -> np.ndarray:
    """``[H, W, 3]`` float32 texture of a land cover, deterministic in ``seed``."""
    width, height = size
    rng = np.random.default_rng([0xB6, seed, LAND_COVERS.index(land_cover)])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, 3), dtype=np.float32)
    if land_cover == "water":
        base = np.array([28, 62, 112], dtype=np.float32)
        waves = (
            _noise(rng, (height, width), 14) * 10
            + np.sin(xx * 0.35 + yy * 0.9 + _noise(rng, (height, width), 6) * 4) * 3
        )
        out[:] = base + waves[..., None] * np.array([0.6, 0.8, 1.0], dtype=np.float32)
    elif land_cover == "forest":
        base = np.array([36, 84, 42], dtype=np.float32)
        crowns = _noise(rng, (height, width), 3.0) * 22 + _noise(rng, (height, width), 18) * 10
        out[:] = base + crowns[..., None] * np.array([0.5, 1.0, 0.5], dtype=np.float32)
    elif land_cover == "bare land":
        base = np.array([172, 142, 102], dtype=np.float32)
        soil = _noise(rng, (height, width), 22) * 20 + _noise(rng, (height, width), 3) * 8
        out[:] = base + soil[..., None]
    elif land_cover == "farmland":
        palette = np.array(
            [[104, 150, 58], [158, 168, 78], [190, 168, 98], [86, 124, 48], [140, 112, 72]],
            dtype=np.float32,
        )
        theta = rng.uniform(0, math.pi)
        along = xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0, 100)
        across = -xx * math.sin(theta) + yy * math.cos(theta) + rng.uniform(0, 100)
        strip_w, parcel_l = rng.uniform(14, 28), rng.uniform(30, 60)
        strip, parcel = np.floor(along / strip_w), np.floor(across / parcel_l)
        field = (strip * 7 + parcel * 3 + rng.integers(0, 5)).astype(np.int64) % len(palette)
        out[:] = palette[field]
        rows = np.sin(across * (2 * math.pi / 3.0)) * 7
        border = (along % strip_w) < 1.0
        out += rows[..., None]
        out[border] *= 0.7
    elif land_cover == "urban":
        spacing = rng.uniform(22, 32)
        road = rng.uniform(3, 4.5)
        ox, oy = rng.uniform(0, spacing, 2)
        bx, by = np.floor((xx + ox) / spacing), np.floor((yy + oy) / spacing)
        block = (bx * 5 + by * 3).astype(np.int64) % 4
        shades = np.array([[128, 124, 118], [142, 138, 132], [116, 116, 112], [134, 130, 120]])
        out[:] = shades[block].astype(np.float32)
        on_road = (((xx + ox) % spacing) < road) | (((yy + oy) % spacing) < road)
        out[on_road] = np.array([72, 72, 76], dtype=np.float32)
        out += _noise(rng, (height, width), 2.5)[..., None] * 6
    else:
        raise ValueError(f"unknown land cover {land_cover!r}; known: {LAND_COVERS}")
    return out


def render(
    land_cover: str,
    objects: tuple[SceneObject, ...] | list[SceneObject],
    image_size: tuple[int, int],
    background_seed: int,
    noise_seed: int,
    gain: float = 1.0,
) -> Image.Image:
    """Draw a scene: the land-cover texture, the objects, then illumination ``gain`` and noise.

    The background depends only on ``(land_cover, background_seed)`` and the sensor noise only on
    ``noise_seed``, so two renders that differ in one object differ only on that object's pixels.
    """
    canvas = Image.fromarray(
        np.clip(_background(land_cover, image_size, background_seed), 0, 255).astype(np.uint8)
    )
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        base = np.array(OBJECT_COLORS[obj.category][obj.color], dtype=np.float64)
        for points, shade in _shape_parts(obj.category, obj.length, obj.width):
            world = _rotate(points, obj.cx, obj.cy, obj.heading)
            fill = tuple(int(v) for v in np.clip(base * shade, 0, 255))
            draw.polygon([tuple(p) for p in world], fill=fill)
    pixels = np.asarray(canvas, dtype=np.float32) * gain
    noise = np.random.default_rng([0x5E, noise_seed]).normal(0.0, 3.0, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8), mode="RGB")


def _colors_for(category: str, covers: tuple[str, ...]) -> list[str]:
    """Colours of ``category`` visible on every land cover of ``covers``."""
    forbidden = {c for cover in covers for c in FORBIDDEN_COLORS[cover]}
    return [c for c in OBJECT_COLORS[category] if c not in forbidden]


def _classes_for(covers: tuple[str, ...]) -> list[str]:
    """Classes that may stand on every land cover of ``covers``."""
    return [c for c in OBJECT_CLASSES if all(c in ALLOWED_CLASSES[cover] for cover in covers)]


def compatible(obj: SceneObject, land_cover: str) -> bool:
    """Whether ``obj`` may stand on ``land_cover`` (class allowed, colour visible there)."""
    return obj.category in ALLOWED_CLASSES[land_cover] and obj.color in _colors_for(
        obj.category, (land_cover,)
    )


def _sample_object(
    rng: np.random.Generator,
    category: str,
    covers: tuple[str, ...],
    size: tuple[int, int],
    scale: float = 1.0,
) -> SceneObject:
    (l_lo, l_hi), (w_lo, w_hi) = SIZES[category]
    length = rng.uniform(l_lo * scale, l_hi * scale)
    if category == "plane":
        width = length * rng.uniform(w_lo, w_hi)
    elif category == "storage tank":
        width = length
    else:
        width = min(rng.uniform(w_lo * scale, w_hi * scale), length)
    if category == "building" and covers[0] == "urban":
        heading = float(rng.choice([0.0, 90.0])) + rng.uniform(-4, 4)
    else:
        heading = rng.uniform(0, 360)
    color = str(rng.choice(_colors_for(category, covers)))
    probe = make_object(category, color, 0.0, 0.0, length, width, heading)
    x1, y1, x2, y2 = probe.xyxy
    width_px, height_px = size
    if x2 - x1 > width_px - 4 or y2 - y1 > height_px - 4:
        raise ValueError(
            f"a {category} at object_scale {scale} spans {x2 - x1:.0f} x {y2 - y1:.0f} px, more "
            f"than a {width_px} x {height_px} image holds: lower object_scale or raise image_size"
        )
    cx = rng.uniform(2 - x1, width_px - 2 - x2)
    cy = rng.uniform(2 - y1, height_px - 2 - y2)
    return make_object(category, color, cx, cy, length, width, heading)


def _free(candidate: SceneObject, placed: list[SceneObject] | tuple[SceneObject, ...]) -> bool:
    x1, y1, x2, y2 = candidate.xyxy
    for other in placed:
        ox1, oy1, ox2, oy2 = other.xyxy
        if x1 < ox2 + _GAP and ox1 < x2 + _GAP and y1 < oy2 + _GAP and oy1 < y2 + _GAP:
            return False
    return True


def _place(
    rng: np.random.Generator,
    categories: list[str],
    covers: tuple[str, ...],
    size: tuple[int, int],
    scale: float = 1.0,
) -> list[SceneObject]:
    """Place objects of ``categories`` without overlap; one that finds no room is skipped."""
    placed: list[SceneObject] = []
    for category in categories:
        for _ in range(_PLACEMENT_TRIES):
            candidate = _sample_object(rng, category, covers, size, scale)
            if _free(candidate, placed):
                placed.append(candidate)
                break
    return placed


def _scene_categories(
    rng: np.random.Generator, covers: tuple[str, ...], least: int, most: int = MAX_OBJECTS
) -> list[str]:
    """``least``..``most`` objects of 1-3 classes, so that classes repeat (counting, plurals,
    comparison)."""
    allowed = _classes_for(covers)
    n_classes = int(rng.integers(1, min(3, len(allowed), most) + 1))
    chosen = [str(c) for c in rng.choice(allowed, size=n_classes, replace=False)]
    n_objects = int(rng.integers(max(least, n_classes), most + 1))
    picks = chosen + [str(c) for c in rng.choice(chosen, size=n_objects - n_classes)]
    rng.shuffle(picks)
    return picks


def _draw_change(rng: np.random.Generator) -> tuple[str, str, str]:
    """``(change kind, land cover before, land cover after)``: every kind equally likely (a
    land-cover change starts from a cover that has a transition)."""
    kind = str(rng.choice(CHANGE_KINDS))
    if kind != "land cover change":
        cover = str(rng.choice(LAND_COVERS))
        return kind, cover, cover
    cover = str(rng.choice([c for c in LAND_COVERS if LAND_COVER_TRANSITIONS[c]]))
    return kind, cover, str(rng.choice(LAND_COVER_TRANSITIONS[cover]))


def _objects_before_after(
    rng: np.random.Generator,
    kind: str,
    covers: tuple[str, str],
    size: tuple[int, int],
    world: WorldSettings = DEFAULT_WORLD,
) -> tuple[tuple[SceneObject, ...], tuple[SceneObject, ...]]:
    """The objects of both images. Added and removed objects are placed with the others, so they
    never overlap them: objects added are the ones the first image lacks."""
    least = 2 if kind == "objects added" else 1
    objects: list[SceneObject] = []
    for _ in range(_SCENE_TRIES):
        categories = _scene_categories(rng, covers, least, world.max_objects)
        objects = _place(rng, categories, covers, size, world.object_scale)
        if len(objects) >= least:
            break
    else:
        raise ValueError(
            f"no room for {least} object(s) at object_scale {world.object_scale} on a "
            f"{size[0]} x {size[1]} image: lower object_scale or raise image_size"
        )
    if kind not in ("objects added", "objects removed"):
        return tuple(objects), tuple(objects)
    # Added: 1 .. n-1 objects (the first image keeps one); removed: 1 .. n (all may go).
    n_changed = int(rng.integers(1, len(objects) + (kind == "objects removed")))
    changed = set(rng.choice(len(objects), size=n_changed, replace=False).tolist())
    kept = tuple(o for i, o in enumerate(objects) if i not in changed)
    if kind == "objects added":
        return kept, kept + tuple(o for i, o in enumerate(objects) if i in changed)
    return tuple(objects), kept


def _as_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        size = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)):
        size = tuple(image_size)
    else:
        raise ValueError(f"image_size must be an int or (width, height), got {image_size!r}")
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) for v in size):
        raise ValueError(f"image_size must be an int or (width, height), got {image_size!r}")
    if min(size) < _MIN_SIDE:
        raise ValueError(f"image_size {size} is too small: each side needs >= {_MIN_SIDE} px")
    return int(size[0]), int(size[1])


def generate_scene(
    seed: int,
    index: int,
    image_size: int | tuple[int, int] = 112,
    world: WorldSettings = DEFAULT_WORLD,
) -> Scene:
    """Scene ``index`` of the stream ``seed``; the same arguments give the same scene."""
    size = _as_size(image_size)
    rng = np.random.default_rng([0x5CE7E, seed, index])
    kind, cover, cover_after = _draw_change(rng)
    objects, objects_after = _objects_before_after(rng, kind, (cover, cover_after), size, world)
    background_seed, noise_before, noise_after = (int(v) for v in rng.integers(0, 2**31, 3))
    gain_after = float(rng.uniform(0.88, 1.12))
    before = SceneState(cover, objects, render(cover, objects, size, background_seed, noise_before))
    after = SceneState(
        cover_after,
        objects_after,
        render(cover_after, objects_after, size, background_seed, noise_after, gain_after),
    )
    return Scene(
        f"scene-{seed}-{index}",
        (seed, index),
        size,
        before,
        after,
        kind,
        background_seed,
        noise_after,
        gain_after,
    )


def generate_scenes(
    seed: int,
    n: int,
    image_size: int | tuple[int, int] = 112,
    world: WorldSettings = DEFAULT_WORLD,
) -> list[Scene]:
    """``n`` scenes of the stream ``seed`` (scene ``i`` is ``generate_scene(seed, i)``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [generate_scene(seed, i, image_size, world) for i in range(n)]
