"""Answer extraction from model completions: tags, labels, numbers, yes/no and boxes.

A completion is ``<think>reasoning</think><answer>answer</answer>``. ``extract_answer`` takes the
text of the last *complete* answer block; the typed parsers below read that text:

* ``parse_label`` / ``parse_labels`` -> canonical class names of ``classes`` (normalised case,
  punctuation, ``_``/``-``, plural forms, glued words such as ``storagetank`` and synonyms);
  an answer naming several classes for a single-label task ("A or B or C") parses to ``None``.
* ``parse_number`` / ``parse_count`` -> one float from digits or English number words.
* ``parse_yes_no`` -> ``True`` / ``False`` / ``None``.
* ``parse_boxes`` -> float64 ``[K, 4]`` xyxy or ``[K, 5]`` ``cx, cy, w, h, angle_deg`` boxes in
  pixels of the original image, from ``[x1, y1, x2, y2]`` / ``(...)`` lists of 4 or 5 numbers
  (read in ``convention``, default Qwen2.5-VL's resized-input pixels), Qwen2.5-VL JSON
  ``{"bbox_2d": [...], "label": ...}`` objects, and GeoChat ``{<x1><y1><x2><y2>|<θ>}`` (always
  read as GeoChat's 0..100 units). Coordinates outside the image are clipped to it; a box with a
  coordinate that overflows float64 is dropped.

``parse_for_task`` hands an answer to its task's parser (``TaskSpec.parse`` in ``geovlm.tasks``),
which combines the parsers above into the typed answer its accuracy reward scores.

Every parser accepts any string and never raises on model output: unreadable text gives ``None``
or an empty result. The work per answer is bounded: ``parse_for_task`` reads no answer longer than
``MAX_ANSWER_CHARS`` (such an answer gives ``None``), ``extract_answer`` skips at most
``MAX_ECHOED_BLOCKS`` blocks echoed from the prompt, and ``parse_boxes`` reads at most ``MAX_BOXES``
box literals; every other step is linear in the answer's length.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice

import numpy as np

from geovlm.data.boxes import CONVENTIONS, qwen25vl_resized_size, to_pixels
from geovlm.data.schema import Target
from geovlm.rewards.geometry import rotated_to_xyxy, xyxy_to_rotated

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# An answer with more boxes than this is a flood: reading only the first MAX_BOXES bounds the
# reward's cost while the box rewards still penalise every extra box that was read.
MAX_BOXES = 1000
# No EO answer comes near this (a detection answer with MAX_BOXES boxes is about 25,000
# characters): a longer one is a flood, not an answer, and is not read at all.
MAX_ANSWER_CHARS = 32_768
# Answer blocks of the prompt's format example that extract_answer skips before it gives up.
MAX_ECHOED_BLOCKS = 16

# Spelling variants and unambiguous synonyms of EO class names. A group gives every member as a
# variant of a class named by any member; callers add their own groups through ``synonyms``.
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("airplane", "aeroplane", "plane", "aircraft"),
    ("airport", "aerodrome"),
    ("harbor", "harbour"),
    ("center", "centre"),
    ("gray", "grey"),
    ("color", "colour"),
    ("parking lot", "parking area", "car park"),
    ("roundabout", "traffic circle"),
    ("baseball diamond", "baseball field"),
    ("ground track field", "track field", "athletics field"),
    ("stadium", "sports stadium"),
    ("river", "stream"),
    ("meadow", "grassland"),
    ("yes", "true"),
    ("no", "false"),
)


def extract_answer(text: str, prompt: str | None = None) -> str | None:
    """The text inside the last complete ``<answer>...</answer>`` block, stripped; else ``None``.

    The block may span newlines. A truncated trailing block (no closing tag) is ignored in favour
    of the last complete one. When ``prompt`` is given, blocks that occur verbatim in it (a format
    example echoed from the instruction) are skipped; a completion that ends in more than
    ``MAX_ECHOED_BLOCKS`` of them has no answer.
    """
    if not isinstance(text, str):
        return None
    end = len(text)
    for _ in range(MAX_ECHOED_BLOCKS + 1):
        close = text.rfind(ANSWER_CLOSE, 0, end)
        if close < 0:
            return None
        start = text.rfind(ANSWER_OPEN, 0, close)
        if start < 0:
            return None
        # The first close after the last open: the block holds no answer tag of either kind.
        close = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        block = text[start : close + len(ANSWER_CLOSE)]
        if prompt and block in prompt:
            end = start
            continue
        return text[start + len(ANSWER_OPEN) : close].strip()
    return None


def extract_think(text: str) -> str | None:
    """The text inside the last complete ``<think>...</think>`` block, stripped; else ``None``."""
    if not isinstance(text, str):
        return None
    close = text.rfind(THINK_CLOSE)
    if close < 0:
        return None
    start = text.rfind(THINK_OPEN, 0, close)
    if start < 0:
        return None
    close = text.find(THINK_CLOSE, start + len(THINK_OPEN))
    return text[start + len(THINK_OPEN) : close].strip()


def valid_unicode(text: str) -> str:
    """``text`` with every lone surrogate code point replaced by ``?`` (the same object when it has
    none). A decoder can emit them; UTF-8 cannot encode them, so tokenizers (the sentence-embedding
    model's among them) refuse such strings."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


# --------------------------------------------------------------------------- text normalisation

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize_text(text: str) -> str:
    """Lower-case ASCII-folded words joined by single spaces (punctuation, ``_``, ``-`` dropped)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return _NON_WORD.sub(" ", folded.lower()).strip()


def _plural_variants(words: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Singular and plural spellings of a (possibly multi-word) name, inflecting its last word."""
    *head, last = words
    forms = {last, last + "s", last + "es"}
    if last.endswith("y") and len(last) > 1:
        forms.add(last[:-1] + "ies")
    if last.endswith("ies") and len(last) > 3:
        forms.add(last[:-3] + "y")
    if last.endswith("es") and len(last) > 2:
        forms.add(last[:-2])
    if last.endswith("s") and len(last) > 1:
        forms.add(last[:-1])
    return {(*head, form) for form in forms if form}


def _variants(name: str) -> set[tuple[str, ...]]:
    words = tuple(normalize_text(name).split())
    if not words:
        return set()
    out = _plural_variants(words)
    out |= {("".join(v),) for v in out}
    return out


class LabelMatcher:
    """Finds the classes of a vocabulary mentioned in a text.

    A class matches its own name in any of its variants (plural forms, glued words) and the
    members of its synonym groups. A variant shared by two classes is kept only for the class
    whose own name produced it; one shared only through synonyms is dropped as ambiguous.
    """

    def __init__(self, classes: tuple[str, ...], synonyms: tuple[tuple[str, ...], ...] = ()):
        self.classes = tuple(dict.fromkeys(c for c in classes if normalize_text(c)))
        own: dict[tuple[str, ...], str] = {}
        for cls in self.classes:
            for v in _variants(cls):
                own.setdefault(v, cls)
        groups = SYNONYM_GROUPS + tuple(synonyms)
        borrowed: dict[tuple[str, ...], set[str]] = {}
        for cls in self.classes:
            name = normalize_text(cls)
            for group in groups:
                if name in {normalize_text(g) for g in group}:
                    for member in group:
                        for v in _variants(member):
                            borrowed.setdefault(v, set()).add(cls)
        self.table = dict(own)
        for v, owners in borrowed.items():
            if v not in own and len(owners) == 1:
                self.table[v] = next(iter(owners))
        self.max_len = max((len(v) for v in self.table), default=0)

    def find_all(self, text: str) -> list[str]:
        """Distinct classes mentioned in ``text``, in order; longest match wins at each word."""
        words = normalize_text(text).split()
        found: dict[str, None] = {}
        i = 0
        while i < len(words):
            for n in range(min(self.max_len, len(words) - i), 0, -1):
                cls = self.table.get(tuple(words[i : i + n]))
                if cls is not None:
                    found[cls] = None
                    i += n
                    break
            else:
                i += 1
        return list(found)

    def exact(self, text: str) -> str | None:
        """The class whose variant is the whole of ``text`` (normalised), else ``None``."""
        return self.table.get(tuple(normalize_text(text).split()))


@lru_cache(maxsize=1024)
def label_matcher(
    classes: tuple[str, ...], synonyms: tuple[tuple[str, ...], ...] = ()
) -> LabelMatcher:
    """A cached ``LabelMatcher`` (vocabularies repeat across a batch)."""
    return LabelMatcher(tuple(classes), tuple(tuple(g) for g in synonyms))


def parse_label(
    answer: str | None,
    classes: tuple[str, ...],
    synonyms: tuple[tuple[str, ...], ...] = (),
) -> str | None:
    """The one class of ``classes`` the answer names, or ``None`` when it names none or several.

    Naming several classes ("farmland or forest") is a hedge, not an answer, hence ``None``.
    """
    if not answer or not classes:
        return None
    found = label_matcher(tuple(classes), tuple(synonyms)).find_all(answer)
    return found[0] if len(found) == 1 else None


_ITEM_SPLIT = re.compile(r"\s*(?:[,;\n|/]|\band\b|\bor\b)\s*")


def split_items(answer: str, distinct: bool = True) -> list[str]:
    """A list answer cut at commas, semicolons, newlines, ``|``, ``/``, "and", "or"; normalised;
    repeated items once (``distinct``) or as often as written."""
    items = [item for item in (normalize_text(i) for i in _ITEM_SPLIT.split(answer)) if item]
    return list(dict.fromkeys(items)) if distinct else items


# Clause ends (a choice list never spans them) and the words that open a question rather than a
# choice ("Which is larger, ships or tanks?": "which is larger" is no choice).
_CLAUSE_END = re.compile(r"[?.!;:\n()\[\]{}]")
_OR = re.compile(r"\s+or\s+")
_QUESTION_WORDS = frozenset(
    "which what is are was were how where who whom whose why when do does did can could will "
    "would should shall may might has have had tell name choose select".split()
)
# Only the last few words of a choice name it ("... more numerous ships or ..." names "ships").
MAX_CHOICE_WORDS = 3


def offered_choices(question: str | None) -> tuple[str, ...]:
    """The alternatives a question offers in an "A or B" / "A, B or C" list, normalised.

    ``"Which are more numerous, ships or storage tanks?"`` -> ``("ships", "storage tanks")``. A list
    ends at a clause boundary (``?.!;:`` or a bracket); comma-separated items before the "or"
    belong to it unless they open the question ("which ..."). Items keep their last
    ``MAX_CHOICE_WORDS`` words. No list gives ``()``.
    """
    if not isinstance(question, str) or " or " not in question.lower():
        return ()
    choices: dict[str, None] = {}
    for clause in _CLAUSE_END.split(question.lower()):
        parts = [normalize_text(p) for p in clause.split(",")]
        for k, part in enumerate(parts):
            if not _OR.search(f" {part} "):
                continue
            items = [p for p in parts[:k] if p and p.split()[0] not in _QUESTION_WORDS]
            items += [i.strip() for i in _OR.split(f" {part} ") if i.strip()]
            for item in items:
                words = [w for w in item.split() if w != "either"]
                if words:
                    choices[" ".join(words[-MAX_CHOICE_WORDS:])] = None
    return tuple(choices)


# Words that name no choice by themselves ("Is it a rural or an urban area?": "it", "a", "an").
_NOT_A_CHOICE_WORD = _QUESTION_WORDS | frozenset(
    "a an the it its this that there these those of in on at to for with by".split()
)


def named_choices(
    answer: str, choices: tuple[str, ...], synonyms: tuple[tuple[str, ...], ...] = ()
) -> set[int]:
    """Indices of the ``choices`` an answer names: by the whole choice, any ending of it, or any
    content word of it that no other choice shares ("tanks" names "storage tanks" unless another
    choice ends in "tanks"; "urban" names "an urban area"), up to plural forms and synonyms."""
    endings: dict[str, set[int]] = {}
    for index, choice in enumerate(choices):
        words = normalize_text(choice).split()
        for n in range(1, len(words) + 1):
            endings.setdefault(" ".join(words[-n:]), set()).add(index)
        for word in words:
            if word not in _NOT_A_CHOICE_WORD:
                endings.setdefault(word, set()).add(index)
    owned = {ending: next(iter(owners)) for ending, owners in endings.items() if len(owners) == 1}
    found = label_matcher(tuple(owned), tuple(synonyms)).find_all(answer)
    return {owned[normalize_text(name)] for name in found}


def parse_labels(
    answer: str | None,
    classes: tuple[str, ...],
    synonyms: tuple[tuple[str, ...], ...] = (),
) -> list[str]:
    """Distinct classes of ``classes`` named in a list answer, in order of mention."""
    if not answer or not classes:
        return []
    return label_matcher(tuple(classes), tuple(synonyms)).find_all(answer)


# --------------------------------------------------------------------------- numbers, yes/no

_DIGITS = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\w)")
_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {
    w: 10 * (i + 2)
    for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())
}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000}
_MULTIPLIERS = set(_SCALES) | {"dozen"}
_NUMBER_WORDS = set(_UNITS) | set(_TENS) | _MULTIPLIERS


# A run of number words worth more than this ("hundred hundred hundred ...") is no count: it
# stops there, as inf, before Python integers grow with the run (and overflow float).
_WORDS_LIMIT = 1e15


def _words_value(words: list[str]) -> float:
    """Value of a run of English number words ("one hundred and five", "a dozen"); ``inf`` once
    the run is worth more than ``_WORDS_LIMIT``."""
    total, current = 0.0, 0.0
    for word in words:
        if word in _UNITS:
            current += _UNITS[word]
        elif word in _TENS:
            current += _TENS[word]
        elif word == "dozen":
            current = max(current, 1.0) * 12
        elif word == "hundred":
            current = max(current, 1.0) * 100
        else:
            total += max(current, 1.0) * _SCALES[word]
            current = 0.0
        if total + current > _WORDS_LIMIT:
            return math.inf
    return total + current


def _word_numbers(text: str) -> list[float]:
    """Values of the runs of English number words in ``text``."""
    words = normalize_text(text).split()
    values, run = [], []
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if word in _NUMBER_WORDS:
            run.append(word)
        elif word == "and" and run and run[-1] in _SCALES and nxt in _NUMBER_WORDS:
            continue  # "one hundred and five"
        elif word in ("a", "an") and nxt in _MULTIPLIERS:
            continue  # "a hundred", "a dozen"
        elif run:
            values.append(_words_value(run))
            run = []
    if run:
        values.append(_words_value(run))
    return values


def _numbers(answer: str) -> set[float]:
    """Distinct values written in digits or words (overflowing digits give ``inf``)."""
    values = {float(m.group().replace(",", "")) for m in _DIGITS.finditer(answer)}
    return values | set(_word_numbers(answer))


def parse_number(answer: str | None) -> float | None:
    """The one number an answer gives (digits or words), or ``None`` if none, several or non-finite.

    "3", "3.0", "three" and "There are 3 ships." give 3; "3 or 4" gives ``None``: a hedge over
    several values does not count as an answer.
    """
    if not answer:
        return None
    values = _numbers(answer)
    if len(values) != 1:
        return None
    value = values.pop()
    return value if math.isfinite(value) else None


_NONE_WORDS = {"none", "no", "nothing"}


def parse_count(answer: str | None) -> float | None:
    """A non-negative count: ``parse_number``, or 0 for "none" / "no ships" (no number given)."""
    if not answer:
        return None
    values = _numbers(answer)
    if not values and _NONE_WORDS & set(normalize_text(answer).split()):
        return 0.0
    value = parse_number(answer)
    return value if value is not None and value >= 0 else None


def is_number(text: str | None) -> bool:
    """Whether the whole of ``text`` is one number in digits or words ("3", "twenty-one"), as a
    gold answer."""
    if not text or parse_number(text) is None:
        return False
    words = normalize_text(text).split()
    allowed = _NUMBER_WORDS | {"a", "and"}
    return bool(words) and all(w.isdigit() or w in allowed for w in words)


_YES = {"yes", "yeah", "yep", "true", "y"}
_NO = {"no", "nope", "false", "n"}


def is_yes_no(text: str | None) -> bool:
    """Whether the whole of ``text`` is a yes or a no word ("Yes.", "false"), as a gold answer."""
    return bool(text) and normalize_text(text) in _YES | _NO


def parse_yes_no(answer: str | None) -> bool | None:
    """``True`` for yes, ``False`` for no, ``None`` when the answer says neither or both."""
    if not answer:
        return None
    words = set(normalize_text(answer).split())
    yes, no = bool(words & _YES), bool(words & _NO)
    return yes if yes != no else None


# --------------------------------------------------------------------------- boxes

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUM_RE = re.compile(_NUM)
_BOX_RE = re.compile(
    rf"(?P<list>[\[(]\s*{_NUM}(?:\s*,\s*{_NUM}){{3,4}}\s*[\])])"
    rf"|(?P<geochat>\{{\s*(?:<\s*{_NUM}\s*>\s*){{4}}(?:\|\s*<\s*{_NUM}\s*>\s*)?\}})"
)
_JSON_OBJECT_RE = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}")
_JSON_LABEL_RE = re.compile(r"\"label\"\s*:\s*\"((?:[^\"\\]|\\.)*)\"")


@lru_cache(maxsize=4096)
def resized_size_for(
    image_size: tuple[int, int], min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """Qwen2.5-VL's resized input size of an image (processor defaults unless given), cached."""
    budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    return qwen25vl_resized_size(tuple(image_size), **budget)


def _scan_boxes(answer: str, max_boxes: int) -> list[tuple[int, str, list[float]]]:
    """(start offset, convention kind, numbers) of each box literal, in order of appearance."""
    out = []
    for match in islice(_BOX_RE.finditer(answer), max_boxes):
        kind = "list" if match.group("list") is not None else "geochat"
        values = [float(v) for v in _NUM_RE.findall(match.group())]
        out.append((match.start(), kind, values))
    return out


def _clip(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    width, height = float(image_size[0]), float(image_size[1])
    if boxes.shape[1] == 4:
        xs = np.clip(boxes[:, [0, 2]], 0.0, width)
        ys = np.clip(boxes[:, [1, 3]], 0.0, height)
        return np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    out = boxes.copy()
    out[:, 0] = np.clip(out[:, 0], 0.0, width)
    out[:, 1] = np.clip(out[:, 1], 0.0, height)
    out[:, 2:4] = np.clip(np.abs(out[:, 2:4]), 0.0, math.hypot(width, height))
    # Angles wrapped into [-180, 180): the same box, and huge angles stay well-conditioned.
    out[:, 4] = np.remainder(out[:, 4] + 180.0, 360.0) - 180.0
    return out


def _check_image_size(image_size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in image_size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from err
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return width, height


def _convert(
    scanned: list[tuple[int, str, list[float]]],
    image_size: tuple[int, int],
    rotated: bool,
    convention: str,
    resized_size: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scanned literals -> (clipped pixel boxes, mask of the literals kept)."""
    width = 5 if rotated else 4
    out = np.full((len(scanned), width), np.nan)
    if convention == "qwen25vl" and resized_size is None and scanned:
        resized_size = resized_size_for(image_size)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (_, kind, values) in enumerate(scanned):
        groups.setdefault((kind, len(values)), []).append(i)
    # Overflow to inf / inf - inf = nan is expected on hostile input; such rows are dropped below.
    with np.errstate(over="ignore", invalid="ignore"):
        for (kind, n), index in groups.items():
            rows = np.asarray([scanned[i][2] for i in index], dtype=np.float64)
            arr = to_pixels(
                rows, "geochat" if kind == "geochat" else convention, image_size, resized_size
            )
            if n == 5 and not rotated:
                arr = rotated_to_xyxy(arr)
            elif n == 4 and rotated:
                arr = xyxy_to_rotated(arr)
            out[index] = arr
    keep = np.isfinite(out).all(axis=1)
    return _clip(out[keep], image_size), keep


def parse_boxes(
    answer: str | None,
    image_size: tuple[int, int],
    *,
    rotated: bool = False,
    convention: str = "qwen25vl",
    resized_size: tuple[int, int] | None = None,
    max_boxes: int = MAX_BOXES,
) -> np.ndarray:
    """Boxes in an answer, as float64 pixels of the original ``image_size`` ``(width, height)``.

    Returns ``[K, 4]`` xyxy (``rotated=False``; a rotated box becomes its enclosing axis-aligned
    box) or ``[K, 5]`` ``cx, cy, w, h, angle_deg`` (``rotated=True``; an axis-aligned box gets angle
    0). Lists of numbers are read in ``convention`` (``resized_size`` overrides the Qwen2.5-VL
    resized input size); GeoChat literals are always GeoChat units. Corners are ordered, values
    clipped to the image; boxes with a value that overflows float64 are dropped.
    """
    return parse_labeled_boxes(
        answer,
        image_size,
        rotated=rotated,
        convention=convention,
        resized_size=resized_size,
        max_boxes=max_boxes,
    )[0]


def parse_labeled_boxes(
    answer: str | None,
    image_size: tuple[int, int],
    *,
    rotated: bool = False,
    convention: str = "qwen25vl",
    resized_size: tuple[int, int] | None = None,
    max_boxes: int = MAX_BOXES,
) -> tuple[np.ndarray, list[str | None]]:
    """``parse_boxes`` plus each box's label from a Qwen2.5-VL ``{"bbox_2d": ..., "label": ...}``.

    Boxes outside such a JSON object get label ``None``. The two outputs stay aligned: a box
    dropped for a non-finite value drops its label too.
    """
    image_size = _check_image_size(image_size)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown box convention {convention!r}; known: {CONVENTIONS}")
    scanned = _scan_boxes(answer, max_boxes) if isinstance(answer, str) else []
    boxes, keep = _convert(scanned, image_size, rotated, convention, resized_size)
    if not scanned:
        return boxes, []
    spans = []
    for obj in _JSON_OBJECT_RE.finditer(answer):
        label = _JSON_LABEL_RE.search(obj.group())
        spans.append((obj.start(), obj.end(), label.group(1) if label else None))
    labels: list[str | None] = []
    span_i = 0
    for (start, _, _), kept in zip(scanned, keep, strict=True):
        while span_i < len(spans) and spans[span_i][1] <= start:
            span_i += 1
        if kept:
            inside = span_i < len(spans) and spans[span_i][0] <= start
            labels.append(spans[span_i][2] if inside else None)
    return boxes, labels


def strip_boxes(answer: str) -> str:
    """The answer with every box literal removed and whitespace collapsed (grounding text)."""
    return " ".join(_BOX_RE.sub(" ", answer).split())


# --------------------------------------------------------------------------- per-task answers

_NONE_ANSWER_WORDS = {"none", "no", "nothing"}
_NONE_FILLER = {"there", "is", "are", "object", "objects", "target", "targets", "found", "detected"}
# An empty JSON list or object, bare or in a Markdown code fence (```json ... ```), as Qwen2.5-VL
# answers a grounding prompt whose object is not in the image.
_EMPTY_JSON = re.compile(r"\s*(?:```[A-Za-z]*\s*)?(?:\[\s*\]|\{\s*\})\s*(?:```)?\s*")


def says_none(answer: str) -> bool:
    """Whether an answer explicitly says there is nothing: "none", "No objects found.", or an
    empty JSON list / object ("[]", "[ ]", a fenced empty list)."""
    if _EMPTY_JSON.fullmatch(answer):
        return True
    words = set(normalize_text(answer).split())
    return bool(words & _NONE_ANSWER_WORDS) and words <= _NONE_ANSWER_WORDS | _NONE_FILLER


@dataclass(frozen=True)
class ParseOptions:
    """How a task parser reads an answer: the model's box ``convention``, the Qwen2.5-VL
    ``resized_size`` of the image (``None``: computed from the image size and the processor's
    default budget), extra ``synonyms`` groups for class names, and the ``prompt`` the answer
    replies to (``None`` when the caller has none), whose offered choices a parser may read."""

    convention: str = "qwen25vl"
    resized_size: tuple[int, int] | None = None
    synonyms: tuple[tuple[str, ...], ...] = ()
    prompt: str | None = None


def parse_for_task(
    answer: str | None,
    target: Target,
    *,
    convention: str = "qwen25vl",
    resized_size: tuple[int, int] | None = None,
    synonyms: tuple[tuple[str, ...], ...] = (),
    prompt: str | None = None,
) -> object | None:
    """The typed answer ``target.task`` needs, or ``None`` when the answer does not give one.

    A blank or missing answer, or one longer than ``MAX_ANSWER_CHARS``, is ``None`` for every task;
    any other text goes to the task's parser (``TaskSpec.parse`` in ``geovlm.tasks``), which says
    what its typed answer is. ``prompt`` (the question) reaches the parser in its options.
    """
    if not isinstance(answer, str) or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return None
    from geovlm.tasks import registry

    prompt = prompt if isinstance(prompt, str) else None
    options = ParseOptions(convention, resized_size, tuple(synonyms), prompt)
    return registry.get(target.task).parse(answer, target, options)
