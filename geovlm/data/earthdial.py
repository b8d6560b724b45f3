"""EarthDial's test sets and result files, and GeoChat's benchmark files -> ``Sample``.

Three shapes of the same benchmark records:

* **Arrow test sets** (EarthDial's ``Eardial_downstream_task_datasets``): folders written by
  ``datasets.Dataset.save_to_disk``, read with ``datasets.load_from_disk``. Columns: ``question``,
  the image ``jpg`` (or ``jpg_A`` .. ``jpg_D`` for bi-temporal sets), and the ground truth
  ``groundtruth`` (or ``groundtruth0`` .. ``groundtruth4`` for captions), with ``ttype`` (detection
  and region captions: ``ref`` / ``grounding``; VQA: the question type), ``size_group``, and for
  grounding descriptions ``obj_ids`` / ``obj_location`` / ``obj_name``.
* **Result files** (EarthDial's ``results/*.jsonl``): one JSON object per line holding the model's
  ``answer`` and the ground truth as its evaluation scripts read it: ``annotation``
  (classification, VQA with ``vqa_type``, region captions with ``task_type`` / ``size_group``),
  ``gt_bbox`` + ``task_type`` + ``size_group`` (referred detection), ``groundtruth`` + ``obj_ids``
  (grounding descriptions), ``caption0`` .. ``caption4`` (image captions and every
  change-detection set: captions, classification, xBD detection).
* **GeoChat benchmark JSONL** (GeoChat-Bench): ``question`` (or ``text``), ``ground_truth``,
  ``type``, ``size_group``, ``image_id`` (``<image_id>.png``) or ``image``.

Arrow rows are first renamed to the result files' fields, so one function reads a record's task
and ground truth for all three. The task is inferred from the fields (``infer_task``; a ``task``
argument overrides it for every record). Boxes are bracketed ``[[x1, y1, x2, y2, θ]]`` on 0..100
(``source_convention="geochat"``, ``box_layout="corners"`` by default); coordinates slightly
below 0 or above 100 are kept, and a degenerate box (a zero side, as a few EarthDial boxes have)
is kept too: it scores IoU 0, as in EarthDial's scripts.

Every target keeps in ``meta``: ``benchmark`` (the data set's name: the folder, or the file's
stem), ``size`` (``size_group``), ``task_type`` and ``question_type`` (``vqa_type``) when given,
and ``earthdial``: the ground truth exactly as EarthDial's scripts read it (``label``, ``boxes``
text, ``references``, ``groundtruth``, ``script``), for ``geovlm.earthdial_metrics``.

Result files have no images: their samples carry none and a nominal 100 x 100 image, so that
0..100 boxes are their own pixels (``read_results``). Images of Arrow rows are written once,
as the bytes stored, into ``<cache>/earthdial-images/`` (``$GEOVLM_CACHE``, else
``~/.cache/geovlm``), so that samples hold paths and a test set never sits decoded in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from geovlm.data.readers import (
    _NUM,
    _Boxes,
    _ImageSizes,
    _Where,
    as_label,
    target_of,
)
from geovlm.data.schema import Sample

# The nominal image of a result file's records: 0..100 boxes are then pixels.
RESULT_IMAGE_SIZE = (100, 100)
# Folder names that are a split, not a benchmark (``AID/test``): the parent names it.
_SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}
_IMAGE_COLUMNS = ("jpg", "jpg_A", "jpg_B", "jpg_C", "jpg_D")
_NESTED_BOX = re.compile(rf"\[+\s*({_NUM}(?:\s*,\s*{_NUM}){{3,4}})\s*\]+")
_ANY_BOX = re.compile(rf"\[\s*{_NUM}(?:\s*,\s*{_NUM}){{3,4}}\s*\]")
_LABEL_QUESTION = re.compile(
    r"classes\s*:|options\s*:|species\s*:|please answer|answer in (?:a )?single word", re.I
)
_VOCABULARY = re.compile(r"(?:classes|options|species)\s*:\s*(.*?)(?:\\n|\n|\.\s+[A-Z\"]|\.\s*$)",
                         re.I | re.S)
_MARKUP = re.compile(r"</?(?:ref|box|p)>")


def benchmark_name(path: Path) -> str:
    """The data set a file or folder holds: its name (a file's stem), or its parent's when the
    folder is a split (``AID/test`` -> ``AID``)."""
    path = Path(path)
    name = path.stem if path.is_file() else path.name
    if name.lower() in _SPLIT_NAMES and path.parent.name:
        return path.parent.name
    return name


def has_only_boxes(text: str) -> bool:
    """Whether ``text`` lists boxes and nothing but boxes (a detection ground truth)."""
    if not isinstance(text, str) or not _ANY_BOX.search(text):
        return False
    return not re.search(r"[A-Za-z]", _ANY_BOX.sub(" ", text))


def _plain_boxes(text: str) -> str:
    """``[[[x1, ..]]]`` and ``<box>..</box>`` / ``<ref>..</ref>`` markup -> ``[x1, ..]`` and
    plain text: the form the project's answers and references take."""
    return re.sub(r"\s+", " ", _MARKUP.sub(" ", _NESTED_BOX.sub(r"[\1]", text))).strip()


def _n_images(question: str) -> int:
    return max(1, question.count("<image>"))


def vocabulary(question: str) -> list[str]:
    """The classes a question offers ("Classes: a, b, c."), as written; ``[]`` when none."""
    match = _VOCABULARY.search(question)
    if not match:
        return []
    items = [item.strip().rstrip(".").strip() for item in match.group(1).split(",")]
    return [item for item in items if item]


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text).lower().rstrip(".")


def spelled_as_class(label: str, classes: list[str]) -> str:
    """``label`` as its class is spelled in ``classes`` when they match without spaces and case
    ("MediumResidential" -> "Medium Residential"), else unchanged."""
    key = _squeeze(label)
    return next((c for c in classes if _squeeze(c) == key), label)


def _family(kind: str) -> str:
    """The registered task an EarthDial record kind names: a task alias or GeoChat tag (the
    registry is the one place tasks are named)."""
    from geovlm.tasks import registry

    task = registry.resolve(kind) or registry.from_tag(kind)
    if task is None:
        raise ValueError(f"no registered task answers to {kind!r} (an alias or a GeoChat tag)")
    return task


def infer_task(record: dict) -> str:
    """The task family of a benchmark record (result-file fields), from its fields:

    ``gt_bbox`` -> referred detection (the rotated task with five-number boxes); ``obj_ids`` ->
    grounding description; ``vqa_type`` -> VQA; ``annotation`` -> region captioning with a
    ``size_group`` / ``task_type``, else scene classification; ``caption0``: boxes only ->
    multi-object detection when the question asks for "all", else referred detection; several
    references -> image or (two or more ``<image>``) change captioning; a question offering
    classes or asking for yes/no -> change detection (a yes/no answer), else temporal (two or
    more images) or scene classification; otherwise a caption.
    """
    question = record.get("question", "")
    if "gt_bbox" in record:
        five = any(len(m.split(",")) == 5 for m in re.findall(r"\[([^\[\]]*)\]", record["gt_bbox"]))
        return _family("rotated_rec" if five else "rec")
    if "obj_ids" in record:
        return _family("grounding")
    if "vqa_type" in record:
        return _family("visual_question_answering")
    if "annotation" in record:
        return _family("identify" if {"size_group", "task_type"} & set(record) else "cls")
    if "caption0" in record:
        first = record["caption0"]
        several = _n_images(question) > 1
        if has_only_boxes(first):
            return _family("detection" if re.search(r"\ball\b", question, re.I) else "rec")
        if any(record.get(f"caption{k}") for k in range(1, 5)):
            return _family("change_captioning" if several else "caption")
        if _LABEL_QUESTION.search(question):
            if as_label(first) in ("yes", "no"):
                return _family("change_detection")
            return _family("temporal_classification" if several else "cls")
        return _family("change_captioning" if several else "caption")
    raise ValueError("no ground-truth field (annotation, gt_bbox, obj_ids, caption0, ground_truth)")


def _text_field(record: dict, name: str, where: _Where) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise where.error(name, f"expected a string, got {type(value).__name__}")
    return value


def normalise_geochat(record: dict) -> dict:
    """A GeoChat-Bench record in the result files' fields: ``ground_truth`` holding boxes ->
    ``gt_bbox`` (``type`` -> ``task_type``), other text -> ``annotation``. Its ``obj_ids`` (object
    ids, not EarthDial's grounding boxes) are left out."""
    out = {k: v for k, v in record.items() if k not in ("ground_truth", "obj_ids")}
    if "question" not in out and isinstance(record.get("text"), str):
        out["question"] = record["text"]
    truth = record["ground_truth"]
    if not isinstance(truth, str):
        truth = json.dumps(truth)
    if isinstance(record.get("type"), str):
        out["task_type"] = record["type"]
    out["gt_bbox" if has_only_boxes(truth) else "annotation"] = truth
    return out


def normalise_arrow(row: dict, columns: set[str]) -> dict:
    """An Arrow row in the result files' fields (how EarthDial's test scripts rename them)."""
    record: dict = {"question": row.get("question")}
    truth = row.get("groundtruth")
    if "groundtruth0" in columns:
        record.update({f"caption{k}": row.get(f"groundtruth{k}") or "" for k in range(5)})
    elif "obj_ids" in columns:
        for name in ("groundtruth", "obj_ids", "size_group", "obj_location", "obj_name"):
            if name in columns:
                record[name] = row.get(name)
    elif "jpg_A" in columns:
        record.update({"caption0": truth, **{f"caption{k}": "" for k in range(1, 5)}})
    elif "size_group" in columns:
        record["gt_bbox" if has_only_boxes(truth) else "annotation"] = truth
        record.update(task_type=row.get("ttype"), size_group=row.get("size_group"))
    elif "ttype" in columns:
        record.update(annotation=truth, vqa_type=row.get("ttype"))
    else:
        record["annotation"] = truth
    return record


def _references(record: dict, task: str) -> tuple[list[str], list[str]]:
    """(references as EarthDial's script uses them, the non-empty ones) of a ``caption<k>``
    record. The change-detection script (bi-temporal tasks) takes ``caption0`` alone when
    ``caption1`` is empty and all five otherwise, empty ones included; the image-captioning
    script always takes all five."""
    from geovlm.tasks import registry

    captions = [record.get(f"caption{k}", "") or "" for k in range(5)]
    script = [captions[0]] if registry.get(task).bitemporal and not captions[1] else captions
    return script, [c for c in captions if c.strip()]


def parse_record(record: dict, task: str | None, where: _Where) -> tuple[str, str, str, dict, dict]:
    """``(task, prompt, answer text, hook record, earthdial meta)`` of one benchmark record in the
    result files' fields. The hook record holds what the task's ``from_record`` reads
    (``classes``, ``captions``, ``obj_ids``, ``size_group`` ...); the meta keeps the ground truth
    as EarthDial's scripts read it."""
    question = _text_field(record, "question", where)
    if task is None:
        try:
            task = infer_task(record)
        except ValueError as err:
            raise where.error("question", f"{err}; pass --task") from None
    prompt = question.replace("<image>", " ").replace("\\n", "\n")
    prompt = "\n".join(line.strip() for line in prompt.strip().splitlines()).strip()
    hook = {k: v for k, v in record.items() if k != "answer"}
    meta: dict = {}
    if "obj_ids" in record:
        truth = _text_field(record, "groundtruth", where)
        meta.update(boxes=_text_field(record, "obj_ids", where), groundtruth=truth)
        hook["obj_ids"] = _plain_boxes(record["obj_ids"])
        return task, prompt, _plain_boxes(truth), hook, meta
    field = next((f for f in ("gt_bbox", "annotation", "caption0") if f in record), None)
    if field is None:
        raise where.error("question", "no ground-truth field (annotation, gt_bbox, obj_ids, "
                                      "caption0)")
    truth = _text_field(record, field, where)
    if field == "gt_bbox" or has_only_boxes(truth):
        # rs_detection's script reads gt_bbox; the change-detection one (xBD) caption0.
        meta.update(boxes=truth, script="rs_detection" if field == "gt_bbox" else "rs_change")
        return task, prompt, _plain_boxes(truth), hook, meta
    hook["classes"] = vocabulary(question)
    meta["label"] = truth
    if field == "annotation":
        meta["references"] = [truth]
        return task, prompt, spelled_as_class(truth, hook["classes"]), hook, meta
    script, references = _references(record, task)
    if not references:
        raise where.error("caption0", "empty ground truth")
    meta["references"] = script
    hook["captions"] = references
    return task, prompt, spelled_as_class(references[0], hook["classes"]), hook, meta


def _target(record, task, where, image_size, boxes: _Boxes, benchmark: str):
    task, prompt, answer, hook, earthdial = parse_record(record, task, where)
    target, prompt_out = target_of(
        task, "earthdial", prompt, answer, hook, image_size, boxes, where,
        ("question", "answer"), False, strict=False,
    )
    target.meta.update(benchmark=benchmark, earthdial=earthdial)
    return target, prompt_out


# --------------------------------------------------------------------------- files and folders


def _jsonl(path: Path) -> Iterator[tuple[int, int, dict]]:
    index = 0
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = _Where(path, index, line_no)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield index, line_no, record
            index += 1


def _record_id(record: dict, stem: str, index: int) -> str:
    for key in ("question_id", "id"):
        if record.get(key) is not None:
            return str(record[key])
    return f"{stem}-{index}"


def _normalised(record: dict) -> dict:
    return normalise_geochat(record) if "ground_truth" in record else record


def read_results(
    path: str | Path, task: str | None = None, box_layout: str = "corners"
) -> tuple[list[Sample], list[str]]:
    """An EarthDial result file (or a GeoChat answer file) -> ``(samples, answers)``.

    Each record's ``answer`` is the prediction; its ground truth becomes the sample's target on
    a nominal 100 x 100 image (boxes on 0..100 are its pixels; read the answers with the
    ``"geochat"`` convention). Samples have no images (they are scored, not generated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} not found")
    benchmark = benchmark_name(path)
    samples, answers = [], []
    seen: set[str] = set()
    for index, line, raw in _jsonl(path):
        where = _Where(path, index, line, raw.get("question_id"))
        if not isinstance(raw.get("answer"), str):
            raise where.error("answer", "missing or not a string: a result record holds the "
                                        "model's answer")
        record = _normalised(raw)
        boxes = _Boxes(RESULT_IMAGE_SIZE, "geochat", "geochat", None, None, box_layout)
        target, prompt = _target(record, task, where, RESULT_IMAGE_SIZE, boxes, benchmark)
        sample_id = _record_id(raw, benchmark, index)
        if sample_id in seen:
            sample_id = f"{sample_id}@{index}"
        seen.add(sample_id)
        samples.append(Sample(sample_id, target.task, [], prompt, target, "",
                              f"{path.name}:{index}"))
        answers.append(raw["answer"])
    return samples, answers


def read_benchmark(
    path: str | Path,
    image_root: str | Path | None = None,
    task: str | None = None,
    convention: str = "qwen25vl",
    source_convention: str = "geochat",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    box_layout: str = "corners",
) -> list[Sample]:
    """An EarthDial Arrow test set (a folder) or an EarthDial / GeoChat benchmark JSONL file ->
    samples with images, prompts and answers in the model's ``convention`` (the arguments are
    ``geovlm.data.readers.read_samples``'s)."""
    path = Path(path)
    settings = (source_convention, convention, min_pixels, max_pixels, box_layout)
    if path.is_dir():
        return _read_arrow(path, task, settings)
    return _read_jsonl(path, image_root, task, settings)


def _read_jsonl(path: Path, image_root, task, settings) -> list[Sample]:
    benchmark = benchmark_name(path)
    sizes = _ImageSizes(Path(image_root) if image_root is not None else path.parent)
    samples: list[Sample] = []
    seen: set[str] = set()
    for index, line, raw in _jsonl(path):
        where = _Where(path, index, line, raw.get("question_id", raw.get("id")))
        record = _normalised(raw)
        located = dict(record)
        if "image" not in located and "images" not in located and raw.get("image_id") is not None:
            located["image"] = f"{raw['image_id']}.png"
        paths, image_sizes = sizes.resolve(located, where)
        boxes = _Boxes(image_sizes[0], *settings)
        target, prompt = _target(record, task, where, image_sizes[0], boxes, benchmark)
        sample_id = _record_id(raw, benchmark, index)
        if sample_id in seen:
            sample_id = f"{sample_id}@{index}"
        seen.add(sample_id)
        samples.append(Sample(sample_id, target.task, list(paths), prompt, target, "",
                              f"{path.name}:{index}"))
    return samples


def _cache_root() -> Path:
    from geovlm.rewards._wordnet import cache_dir

    return cache_dir() / "earthdial-images"


def _image_file(cell, folder: Path, stem: str, where: _Where, column: str):
    """``(path, (width, height))`` of one undecoded Arrow image cell (``{"bytes", "path"}``),
    its bytes written once to ``folder/stem.<format>``."""
    if not isinstance(cell, dict):
        raise where.error(column, f"expected an image, got {type(cell).__name__}")
    data, source = cell.get("bytes"), cell.get("path")
    if data is None:
        if source and Path(source).is_file():
            data = Path(source).read_bytes()
        else:
            raise where.error(column, f"image has neither bytes nor a readable path ({source!r})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            size, kind = image.size, (image.format or "png").lower()
    except (UnidentifiedImageError, OSError) as err:
        raise where.error(column, f"cannot read the image: {err}") from None
    target = folder / f"{stem}.{'jpg' if kind == 'jpeg' else kind}"
    if not target.is_file():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return target, size


def _read_arrow(path: Path, task, settings) -> list[Sample]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    benchmark = benchmark_name(path)
    samples: list[Sample] = []
    for split, dataset in parts:
        columns = set(dataset.column_names)
        image_columns = [c for c in _IMAGE_COLUMNS if c in columns]
        if "question" not in columns or not image_columns:
            raise ValueError(
                f"{path}{'/' + split if split else ''}: an EarthDial test set needs 'question' "
                f"and an RGB image column ({', '.join(_IMAGE_COLUMNS)}); columns: "
                f"{sorted(columns)} (multispectral sets - tif_ms, rgbi, tif_pl - need a "
                "multispectral encoder)"
            )
        for column in image_columns:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        key = hashlib.sha256(f"{path.resolve()}:{split}:{dataset._fingerprint}".encode())
        folder = _cache_root() / f"{benchmark}-{key.hexdigest()[:16]}"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"{benchmark}-{split}" if split else benchmark
        for row_index, row in enumerate(dataset):
            where = _Where(path, row_index, None, f"{prefix}-{row_index}")
            images = [
                _image_file(row[c], folder, f"{row_index}-{c}", where, c)
                for c in image_columns
                if row.get(c) is not None
            ]
            if not images:
                raise where.error(image_columns[0], "no image in this row")
            record = normalise_arrow(row, columns)
            boxes = _Boxes(images[0][1], *settings)
            target, prompt = _target(record, task, where, images[0][1], boxes, benchmark)
            samples.append(
                Sample(f"{prefix}-{row_index}", target.task, [p for p, _ in images], prompt,
                       target, "", f"{prefix}:{row_index}")
            )
    return samples
