"""Readers for real data files -> ``Sample``: LLaVA / GeoChat-style JSON, VLM-R1 JSONL, and
(through ``geovlm.data.earthdial``) EarthDial's Arrow test sets and EarthDial / GeoChat benchmark
JSONL.

Formats:

* ``"llava"`` (also GeoChat): a JSON list of ``{"id", "image", "conversations": [{"from":
  "human" | "gpt", "value"}, ...]}``; ``"<image>"`` placeholders in the human turns; GeoChat
  boxes ``{<x1><y1><x2><y2>|<θ>}`` on 0..100 (``|<θ>`` optional) and task tags such as
  ``[refer]``. Every human -> gpt exchange becomes one sample.
* ``"vlmr1"``: JSON lines of ``{"image" | "images", "problem" + "solution" | "conversations",
  "task" | "type", ...}``; ``"image"`` may be a list (several images per sample). An answer
  wrapped in ``<answer>...</answer>`` is unwrapped, and a ``<think>...</think>`` becomes the
  sample's think trace (the SFT target's reasoning); an answer without one takes the record's
  ``think`` / ``reasoning`` / ``rationale`` field, if any.
* ``"earthdial"``: a folder saved by ``datasets.Dataset.save_to_disk`` (EarthDial's test sets) or
  a JSONL benchmark file (EarthDial's / GeoChat's ``question`` + ground-truth records), read by
  ``geovlm.data.earthdial``.

``"auto"`` (``resolve_format``) picks ``earthdial`` for folders and benchmark JSONL, ``vlmr1``
for other ``.jsonl`` files and ``llava`` otherwise; ``llava`` and ``vlmr1`` accept both record
shapes. Image paths are relative to ``image_root`` (default: the data file's folder). Boxes are
converted to float64 pixels of the original image, whose size is read from the image file's
header, and re-rendered in the model's ``convention`` in prompts and answers: GeoChat boxes
are recognised by their syntax, bracketed ``[x1, y1, x2, y2]`` boxes are read in
``source_convention`` and five bracketed numbers in the ``box_layout`` (``geovlm.data.boxes``:
corners + θ as GeoChat and EarthDial write them, or centre + θ). Axis-aligned tasks take the
enclosing box of a rotated one; rotated tasks read an axis-aligned box as angle 0. Labels
(classification, VQA) are lower case without a trailing period; captions are kept as written.

The task comes from the ``task`` argument, else a ``task`` / ``type`` field of the record (a task
name or one of its aliases, e.g. ``"rec"``), else a GeoChat tag (``[refer]``, ``[grounding]``,
``[identify]``, ``[caption]``, ``[vqa]``); names, aliases and tags are the registered tasks'
(``geovlm.tasks``). The reader finds the exchange's boxes, converts them and re-renders the prompt;
the task's ``TaskSpec.from_record`` hook turns the ``Exchange`` into its ``Target``.
A malformed record raises ``ValueError`` and a missing image ``FileNotFoundError``, each naming
the file, the record (index, line, id) and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from geovlm.data.boxes import (
    CONVENTIONS,
    LAYOUTS,
    from_pixels,
    qwen25vl_resized_size,
    render_box,
    to_pixels,
)
from geovlm.data.schema import Sample, Target

FORMATS: tuple[str, ...] = ("auto", "llava", "geochat", "vlmr1", "earthdial")
# Record fields holding the SFT reasoning trace of an answer written without ``<think>``.
REASONING_FIELDS: tuple[str, ...] = ("think", "reasoning", "rationale")

_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_GEOCHAT_BOX = re.compile(
    rf"\{{\s*<({_NUM})>\s*<({_NUM})>\s*<({_NUM})>\s*<({_NUM})>\s*(?:\|\s*<({_NUM})>\s*)?\}}"
)
_BRACKET_BOX = re.compile(
    rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*"
    rf"(?:,\s*({_NUM})\s*)?\]"
)
_TAG = re.compile(r"^\s*\[(\w+)\]\s*")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_HUMAN, _ASSISTANT = {"human", "user"}, {"gpt", "assistant"}


class _Where:
    """Names a record in error messages: file, record index, JSONL line and id."""

    def __init__(self, path: Path, index: int, line: int | None, record_id: object = None):
        self.path, self.index, self.line, self.record_id = path, index, line, record_id

    def __str__(self) -> str:
        text = f"{self.path}: record {self.index}"
        if self.line is not None:
            text += f" (line {self.line})"
        if self.record_id is not None:
            text += f", id {self.record_id!r}"
        return text

    def error(self, field: str, message: str) -> ValueError:
        return ValueError(f"{self}, field {field!r}: {message}")


def _records(path: Path, fmt: str) -> Iterator[tuple[int, int | None, object]]:
    """``(index, line or None, record)`` of a JSON list or a JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    if fmt == "vlmr1":
        index = 0
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}: record {index} (line {line_no}): invalid JSON: {err.msg} "
                    f"(column {err.colno})"
                ) from None
            yield index, line_no, record
            index += 1
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield index, None, record


def _text(value: object, where: _Where, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # VLM-R1 allows numeric solutions
    raise where.error(field, f"expected a string, got {type(value).__name__}")


def _exchanges(record: dict, where: _Where) -> list[tuple[str, str, str, str]]:
    """The record's ``(human field, human text, assistant field, assistant text)`` exchanges."""
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise where.error("conversations", "expected a non-empty list of turns")
        pairs: list[tuple[str, str, str, str]] = []
        pending: tuple[str, str] | None = None
        for k, turn in enumerate(turns):
            field = f"conversations[{k}]"
            if not isinstance(turn, dict):
                raise where.error(field, f"expected an object, got {type(turn).__name__}")
            role = turn.get("from", turn.get("role"))
            if "value" not in turn and "content" not in turn:
                raise where.error(field, "missing 'value'")
            value = _text(turn.get("value", turn.get("content")), where, field + ".value")
            if role == "system":
                continue
            if role in _HUMAN:
                if pending is not None:
                    raise where.error(field, "two human turns in a row")
                pending = (field, value)
            elif role in _ASSISTANT:
                if pending is None:
                    raise where.error(field, "an assistant turn without a human turn before it")
                pairs.append((*pending, field, value))
                pending = None
            else:
                raise where.error(field + ".from", f"unknown role {role!r}")
        if pending is not None:
            raise where.error("conversations", "the last human turn has no answer")
        if not pairs:
            raise where.error("conversations", "no human -> assistant exchange")
        return pairs
    if "problem" in record:
        if "solution" not in record:
            raise where.error("solution", "missing (a 'problem' needs a 'solution')")
        problem = _text(record["problem"], where, "problem")
        return [("problem", problem, "solution", _text(record["solution"], where, "solution"))]
    raise where.error("conversations", "missing: a record needs 'conversations' or 'problem'")


class _ImageSizes:
    """Resolves image paths under the root and reads their sizes from the file headers, cached."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sizes: dict[Path, tuple[int, int]] = {}

    def resolve(self, record: dict, where: _Where) -> tuple[list[Path], list[tuple[int, int]]]:
        if "image" in record and "images" in record:
            raise where.error("images", "both 'image' and 'images' are given")
        field = "image" if "image" in record else "images"
        if field not in record:
            raise where.error("image", "missing: every sample needs at least one image")
        value = record[field]
        names = value if isinstance(value, list) else [value]
        if not names:
            raise where.error(field, "empty image list")
        paths, sizes = [], []
        for k, name in enumerate(names):
            sub = f"{field}[{k}]" if isinstance(value, list) else field
            if not isinstance(name, str) or not name.strip():
                raise where.error(sub, f"expected a non-empty path string, got {name!r}")
            path = Path(name) if Path(name).is_absolute() else self.root / name
            paths.append(path)
            sizes.append(self._size(path, where, sub))
        return paths, sizes

    def _size(self, path: Path, where: _Where, field: str) -> tuple[int, int]:
        if path not in self.sizes:
            if not path.is_file():
                raise FileNotFoundError(f"{where}, field {field!r}: image {path} not found")
            try:
                with Image.open(path) as image:
                    self.sizes[path] = image.size
            except (UnidentifiedImageError, OSError) as err:
                raise where.error(field, f"cannot read image {path}: {err}") from None
        return self.sizes[path]


class _Boxes:
    """Box conversion for one sample: source conventions -> pixels -> the model's convention.

    Bracketed boxes are read in ``source`` with five numbers in ``layout``; GeoChat's ``{<..>}``
    boxes are always GeoChat's (0..100, corners + θ).
    """

    def __init__(
        self, image_size, source: str, target: str, min_pixels, max_pixels, layout: str | None
    ) -> None:
        self.image_size, self.source, self.target, self.layout = image_size, source, target, layout
        self.resized = None
        if "qwen25vl" in (source, target):
            budget = {
                k: v
                for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                if v is not None
            }
            self.resized = qwen25vl_resized_size(image_size, **budget)

    def find(self, text: str) -> list[tuple[tuple[int, int], np.ndarray]]:
        """``(span, [4] xyxy or [5] rotated pixels)`` of every box in ``text``, in order; a box
        its layout cannot read is a ``ValueError``."""
        found = []
        readers = ((_GEOCHAT_BOX, "geochat", "corners"), (_BRACKET_BOX, self.source, self.layout))
        for pattern, convention, layout in readers:
            for match in pattern.finditer(text):
                values = [float(v) for v in match.groups() if v is not None]
                pixels = to_pixels(
                    np.array([values]), convention, self.image_size, self.resized, layout
                )
                found.append((match.span(), pixels[0]))
        return sorted(found, key=lambda item: item[0])

    def render(self, box: np.ndarray) -> str:
        converted = from_pixels(box[None], self.target, self.image_size, self.resized)[0]
        return render_box(converted, self.target)


# geovlm.rewards.geometry has batched twins of these two (rotated_to_xyxy, xyxy_to_rotated);
# importing it would load the numba reward stack into data loading, so they live here too.
def enclosing_box(box: np.ndarray) -> np.ndarray:
    """Axis-aligned box around a ``[5]`` rotated box (or the ``[4]`` box itself)."""
    if box.shape[0] == 4:
        return box
    cx, cy, w, h, angle = box
    a = math.radians(angle)
    half_x = (abs(w * math.cos(a)) + abs(h * math.sin(a))) / 2
    half_y = (abs(w * math.sin(a)) + abs(h * math.cos(a))) / 2
    return np.array([cx - half_x, cy - half_y, cx + half_x, cy + half_y])


def as_rotated(box: np.ndarray) -> np.ndarray:
    """A ``[4]`` xyxy box as ``[5]`` rotated with angle 0 (a rotated box unchanged)."""
    if box.shape[0] == 5:
        return box
    x1, y1, x2, y2 = box
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.0])


def _check_box(box: np.ndarray, where: _Where, field: str, strict: bool = True) -> None:
    if not np.all(np.isfinite(box)):
        raise where.error(field, f"non-finite box {box.tolist()}")
    if not strict:
        return
    w, h = (box[2] - box[0], box[3] - box[1]) if box.shape[0] == 4 else (box[2], box[3])
    if w <= 0 or h <= 0:
        raise where.error(field, f"degenerate box {box.tolist()} (width/height must be > 0)")


def clean_text(text: str) -> str:
    """Drop GeoChat's phrase markers, collapse runs of spaces and spaces before punctuation."""
    text = text.replace("<p>", " ").replace("</p>", " ")
    return re.sub(r"[ \t]+([,.;:!?])", r"\1", re.sub(r"[ \t]+", " ", text)).strip()


def _rerender(text: str, boxes: _Boxes, found, rotated: bool | None = None) -> str:
    """``text`` with every box replaced by its rendering in the model's convention."""
    out, last = [], 0
    for (start, end), box in found:
        if rotated is not None:
            box = as_rotated(box) if rotated else enclosing_box(box)
        out.append(text[last:start])
        out.append(boxes.render(box))
        last = end
    out.append(text[last:])
    return "".join(out)


def _strip_boxes(text: str, found) -> str:
    out, last = [], 0
    for (start, end), _ in found:
        out.append(text[last:start])
        last = end
    out.append(text[last:])
    return clean_text("".join(out))


def as_label(text: str) -> str:
    """A class / short answer: lower case, without a trailing period."""
    return clean_text(text).rstrip(".").strip().lower()


@dataclass
class Exchange:
    """One human -> assistant exchange of a record, as a task's ``from_record`` hook reads it.

    Attributes:
        task: the task the record names (the spec whose hook is called).
        format: the file format, ``"llava"``, ``"vlmr1"`` or ``"earthdial"``.
        record: the record's JSON object (extra fields: ``classes``, ``captions``, ...).
        prompt: the human text without ``<image>`` placeholders, boxes as written.
        answer: the assistant's answer (``<answer>`` unwrapped, ``<think>`` removed), as written.
        image_size: ``(width, height)`` of the (first) image, in pixels.
        answer_boxes: the boxes written in the answer, in order, as pixels of the original image
            (``[4]`` xyxy or ``[5]`` rotated; finite, positive width and height).
        prompt_boxes: the boxes written in the prompt, likewise.
        from_tag: the task came from a GeoChat tag, not a field.
    """

    task: str
    format: str
    record: dict
    prompt: str
    answer: str
    image_size: tuple[int, int]
    answer_boxes: list[np.ndarray]
    prompt_boxes: list[np.ndarray]
    from_tag: bool
    _where: _Where
    _field: str
    _boxes: _Boxes
    _found: list
    _strict: bool = True

    def error(self, message: str, field: str | None = None) -> ValueError:
        """A ``ValueError`` naming the file, the record and ``field`` (default: the answer's)."""
        return self._where.error(field or self._field, message)

    def plain_answer(self) -> str:
        """The answer with its boxes removed, spaces cleaned."""
        return _strip_boxes(self.answer, self._found)

    def render(self, box: np.ndarray) -> str:
        """A pixel box as the model writes it (its convention)."""
        return self._boxes.render(box)

    def rerendered_answer(self, rotated: bool | None = None) -> str:
        """The answer with every box re-rendered in the model's convention (``rotated``: as
        rotated boxes, or as axis-aligned hulls when ``False``; as found when ``None``)."""
        return clean_text(_rerender(self.answer, self._boxes, self._found, rotated))

    def field_boxes(self, name: str) -> list[np.ndarray]:
        """The boxes written in the record's text field ``name``, in pixels (as ``answer_boxes``);
        ``[]`` when the record has no such field."""
        if name not in self.record:
            return []
        value = self.record[name]
        if not isinstance(value, str):
            raise self.error(f"expected a string of boxes, got {type(value).__name__}", name)
        found = find_boxes(self._boxes, value, self._where, name, self._strict)
        return [box for _, box in found]

    def string_list(self, *names: str) -> tuple[str, ...]:
        """The first of the record's fields ``names`` that is present, a list of strings."""
        for name in names:
            if name in self.record:
                value = self.record[name]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise self.error("expected a list of strings", name)
                return tuple(value)
        return ()


def _task_of(record: dict, prompt: str, explicit: str | None, where: _Where) -> tuple[str, bool]:
    """The exchange's task, and whether it came from a GeoChat tag."""
    from geovlm.tasks import registry

    if explicit is not None:
        return explicit, False
    for field in ("task", "type"):
        if field in record:
            value = record[field]
            task = registry.resolve(value) if isinstance(value, str) else None
            if task is None:
                raise where.error(
                    field,
                    f"unknown task {value!r}; known: {list(registry.names())} "
                    f"or {sorted(registry.aliases())}",
                )
            return task, False
    tag = _TAG.match(prompt)
    if tag and registry.from_tag(tag.group(1)) is not None:
        return registry.from_tag(tag.group(1)), True
    raise where.error(
        "task", "cannot infer the task: pass task=..., or give the record a 'task' or 'type' field"
    )


def find_boxes(
    boxes: _Boxes, text: str, where: _Where, field: str, strict: bool = True
) -> list:
    """``boxes.find(text)`` with every box checked: finite, and with ``strict`` positive sides
    too; errors name the record and ``field``."""
    try:
        found = boxes.find(text)
    except ValueError as err:
        raise where.error(field, str(err)) from None
    for k, (_, box) in enumerate(found):
        _check_box(box, where, f"{field} (box {k})", strict)
    return found


def target_of(
    task: str,
    fmt: str,
    prompt: str,
    answer_text: str,
    record: dict,
    image_size: tuple[int, int],
    boxes: _Boxes,
    where: _Where,
    fields: tuple[str, str],
    from_tag: bool,
    strict: bool = True,
) -> tuple[Target, str]:
    """The Target of one exchange (the task's ``from_record``), and its prompt with boxes
    re-rendered in the model's convention. ``fields`` name the prompt's and the answer's fields
    in error messages; ``strict=False`` keeps degenerate boxes (a zero side: benchmark files
    have a few, and they score IoU 0)."""
    from geovlm.tasks import registry

    prompt_field, field = fields
    found = find_boxes(boxes, answer_text, where, field, strict)
    prompt_found = find_boxes(boxes, prompt, where, prompt_field, strict)
    prompt_out = clean_text(_rerender(prompt, boxes, prompt_found))
    read = registry.get(task).from_record
    if read is None:
        raise where.error("task", f"task {task!r} cannot be read from data files")
    exchange = Exchange(
        task=task,
        format=fmt,
        record=record,
        prompt=prompt,
        answer=answer_text,
        image_size=image_size,
        answer_boxes=[box for _, box in found],
        prompt_boxes=[box for _, box in prompt_found],
        from_tag=from_tag,
        _where=where,
        _field=field,
        _boxes=boxes,
        _found=found,
        _strict=strict,
    )
    target = read(exchange)
    target.meta.update(record_meta(record))
    return target, prompt_out


def record_meta(record: dict) -> dict:
    """Evaluation facts a benchmark record states (they override what a task hook derives):
    ``size_group`` (small / medium / large: the size split, instead of the area bucket) ->
    ``meta["size"]``, ``task_type`` -> ``meta["task_type"]``, ``question_type`` / ``vqa_type``
    -> ``meta["question_type"]`` (VQA's per-type columns)."""
    meta = {}
    size = record.get("size_group")
    if isinstance(size, str) and size.strip().lower() in ("small", "medium", "large"):
        meta["size"] = size.strip().lower()
    if isinstance(record.get("task_type"), str) and record["task_type"].strip():
        meta["task_type"] = record["task_type"].strip()
    for name in ("question_type", "vqa_type"):
        if isinstance(record.get(name), str) and record[name].strip():
            meta["question_type"] = record[name].strip()
            break
    return meta


def _split_answer(text: str) -> tuple[str, str]:
    """``(answer, think)`` of an assistant turn: unwrap ``<answer>``, keep ``<think>``."""
    think = _THINK.search(text)
    answer = _ANSWER.search(text)
    if answer:
        return answer.group(1).strip(), think.group(1).strip() if think else ""
    body = _THINK.sub("", text) if think else text
    return body.strip(), think.group(1).strip() if think else ""


def _reasoning(record: dict, where: _Where) -> str:
    """The record's reasoning trace (``REASONING_FIELDS``), for an answer without ``<think>``."""
    for name in REASONING_FIELDS:
        if name in record and record[name] is not None:
            return _text(record[name], where, name).strip()
    return ""


def resolve_format(path: Path, fmt: str) -> str:
    """The format a file is read in: ``fmt``, or for ``"auto"``: ``"earthdial"`` for a folder
    (a ``datasets`` Arrow test set) or a JSONL file whose first record is a benchmark record
    (``question`` without ``conversations`` / ``problem``), ``"vlmr1"`` for other JSONL files,
    ``"llava"`` otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    if fmt != "auto":
        return "llava" if fmt == "geochat" else fmt
    if path.is_dir():
        return "earthdial"
    if path.suffix.lower() != ".jsonl":
        return "llava"
    with path.open(encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        record = json.loads(first) if first else {}
    except json.JSONDecodeError:
        return "vlmr1"  # the reader names the bad line
    benchmark = isinstance(record, dict) and "question" in record
    return "earthdial" if benchmark and not {"conversations", "problem"} & set(record) else "vlmr1"


def check_conventions(convention: str, source_convention: str | None, layout: str | None) -> None:
    for name, value in (("convention", convention), ("source_convention", source_convention)):
        if value is not None and value not in CONVENTIONS:
            raise ValueError(f"unknown {name} {value!r}; known: {CONVENTIONS}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown box layout {layout!r}; known: {LAYOUTS}")


def read_samples(
    path: str | Path,
    image_root: str | Path | None = None,
    fmt: str = "auto",
    task: str | None = None,
    convention: str = "qwen25vl",
    source_convention: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    box_layout: str | None = None,
) -> list[Sample]:
    """Read a data file into samples (see the module docstring).

    Args:
        path: the data file (an Arrow test set is a folder).
        image_root: folder the records' relative image paths are under (default: the file's).
        fmt: ``"auto"`` (``resolve_format``), ``"llava"`` (= ``"geochat"``), ``"vlmr1"`` or
            ``"earthdial"`` (``geovlm.data.earthdial``).
        task: the task of every record; ``None`` reads it from each record.
        convention: the model's box convention, used to render boxes in prompts and answers.
        source_convention: the convention of bracketed ``[...]`` boxes in the file (GeoChat
            ``{<..>}`` boxes are always read as ``"geochat"``); ``None``: the format's
            (``"geochat"``, 0..100, for EarthDial / GeoChat benchmarks, else ``"pixels"``).
        min_pixels, max_pixels: the processor's pixel budget, for the ``"qwen25vl"`` resize.
        box_layout: how five bracketed numbers are read (``geovlm.data.boxes.LAYOUTS``);
            ``None``: the format's (corners for EarthDial / GeoChat benchmarks, else the source
            convention's default).
    """
    path = Path(path)
    check_conventions(convention, source_convention, box_layout)
    if task is not None:
        from geovlm.tasks import registry

        registry.check([task])
    if not path.exists():
        raise FileNotFoundError(f"data file {path} not found")
    fmt = resolve_format(path, fmt)
    if fmt == "earthdial":
        from geovlm.data.earthdial import read_benchmark

        return read_benchmark(
            path,
            image_root=image_root,
            task=task,
            convention=convention,
            source_convention=source_convention or "geochat",
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            box_layout=box_layout or "corners",
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} is a folder, not a {fmt} file")
    source_convention = source_convention or "pixels"
    sizes = _ImageSizes(Path(image_root) if image_root is not None else path.parent)
    samples: list[Sample] = []
    seen: set[str] = set()
    for index, line, record in _records(path, fmt):
        where = _Where(path, index, line)
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        where.record_id = record.get("id")
        pairs = _exchanges(record, where)
        paths, image_sizes = sizes.resolve(record, where)
        placeholders = sum(human.count("<image>") for _, human, _, _ in pairs)
        if placeholders and placeholders != len(paths):
            raise where.error(
                "conversations" if "conversations" in record else "problem",
                f"{placeholders} <image> placeholders for {len(paths)} image(s)",
            )
        boxes = _Boxes(
            image_sizes[0], source_convention, convention, min_pixels, max_pixels, box_layout
        )
        base = str(record["id"]) if record.get("id") is not None else f"{path.stem}-{index}"
        for turn, (human_field, human, field, assistant) in enumerate(pairs):
            prompt = human.replace("<image>", "").strip()
            sample_task, from_tag = _task_of(record, prompt, task, where)
            answer_text, think = _split_answer(assistant)
            if not think and len(pairs) == 1:
                think = _reasoning(record, where)
            target, prompt_out = target_of(
                sample_task,
                fmt,
                prompt,
                answer_text,
                record,
                image_sizes[0],
                boxes,
                where,
                (human_field, field),
                from_tag,
            )
            sample_id = base if len(pairs) == 1 else f"{base}-{turn}"
            if sample_id in seen:
                sample_id = f"{sample_id}@{index}"
            seen.add(sample_id)
            samples.append(
                Sample(
                    sample_id,
                    target.task,
                    list(paths),
                    prompt_out,
                    target,
                    think,
                    f"{path.name}:{index}",
                )
            )
    return samples
