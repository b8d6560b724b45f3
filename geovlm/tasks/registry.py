"""The one registry of task families: name -> ``TaskSpec``, in registration order.

The built-in families register when ``geovlm.tasks`` is first imported (the package imports its
task modules in the paper's order); any code may register more with ``register(spec)``, and a run
names modules to import for it with ``data.task_modules`` (``import_task_modules``), which is how
a task reaches every process under torchrun and the evaluation CLI.

The registration order is the order of tables and summaries, and a task's position in it is its
random stream in the embedded world (``index``): the built-in families keep theirs whatever is
registered after them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from geovlm.tasks.spec import TaskSpec

_SPECS: dict[str, TaskSpec] = {}


def _key(label: str) -> str:
    """A record's task label with case, ``-`` and spaces folded ("Rotated-REC" -> "rotated_rec")."""
    return label.strip().lower().replace("-", "_").replace(" ", "_")


def register(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add ``spec`` to the registry; returns it.

    Registering the same spec object again is a no-op. Another spec under a registered name is an
    error unless ``replace`` (the new spec then takes the old one's position). An alias or GeoChat
    tag another task already claims is an error.
    """
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register() takes a TaskSpec, got {type(spec).__name__}")
    current = _SPECS.get(spec.name)
    if current is spec:
        return spec
    if current is not None and not replace:
        raise ValueError(f"task {spec.name!r} is already registered (pass replace=True)")
    others = [s for s in _SPECS.values() if s.name != spec.name]
    claimed = {_key(label): s.name for s in others for label in (s.name, *s.aliases)}
    for alias in spec.aliases:
        if _key(alias) in claimed or _key(alias) == spec.name:
            owner = claimed.get(_key(alias), spec.name)
            raise ValueError(f"task {spec.name!r}: alias {alias!r} already names {owner!r}")
    if spec.name in claimed:
        raise ValueError(f"task name {spec.name!r} is an alias of {claimed[spec.name]!r}")
    tags = {tag.lower(): s.name for s in others for tag in s.tags}
    for tag in spec.tags:
        if tag.lower() in tags:
            owner = tags[tag.lower()]
            raise ValueError(f"task {spec.name!r}: tag {tag!r} already selects {owner!r}")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> TaskSpec:
    """Remove a task; returns its spec. Later tasks move up one position."""
    spec = get(name)
    del _SPECS[name]
    return spec


@contextmanager
def registered(spec: TaskSpec, *, replace: bool = False) -> Iterator[TaskSpec]:
    """``register(spec)`` for the duration of a ``with`` block; the registry is then restored to
    what it was before the block (tests, one-off experiments)."""
    before = dict(_SPECS)
    register(spec, replace=replace)
    try:
        yield spec
    finally:
        _SPECS.clear()
        _SPECS.update(before)


def get(name: str) -> TaskSpec:
    """The spec of a registered task; an unknown name is a ``ValueError`` listing the known."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known: {list(_SPECS)}") from None


def names() -> tuple[str, ...]:
    """Every registered task, in registration order."""
    return tuple(_SPECS)


def specs() -> tuple[TaskSpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_SPECS.values())


def index(name: str) -> int:
    """A task's position in the registration order (its embedded-world stream, its table row)."""
    get(name)
    return list(_SPECS).index(name)


def check(tasks: Iterable[str]) -> list[str]:
    """``tasks`` as a list, each a registered name; else a ``ValueError`` naming the unknown."""
    chosen = list(tasks)
    unknown = [t for t in chosen if t not in _SPECS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(_SPECS)}")
    return chosen


def resolve(label: str) -> str | None:
    """The task a record's ``task`` / ``type`` value names (its name or an alias, any case, ``-``
    or space for ``_``), else ``None``."""
    key = _key(label)
    if key in _SPECS:
        return key
    return next((s.name for s in _SPECS.values() if key in map(_key, s.aliases)), None)


def aliases() -> dict[str, str]:
    """alias -> task, over every registered task (for error messages and docs)."""
    return {_key(alias): s.name for s in _SPECS.values() for alias in s.aliases}


def from_tag(tag: str) -> str | None:
    """The task a GeoChat tag (``[refer]`` -> ``"refer"``, any case) selects, else ``None``."""
    tag = tag.lower()
    return next((s.name for s in _SPECS.values() if tag in (t.lower() for t in s.tags)), None)


def import_task_modules(modules: Iterable[str]) -> list[TaskSpec]:
    """Import each module (a dotted path) and register the specs of its ``SPECS`` sequence.

    Importing twice is harmless (the same spec objects register once). A module that cannot be
    imported or has no ``SPECS`` of ``TaskSpec`` s is an error naming it.
    """
    if isinstance(modules, str):
        raise TypeError(f"import_task_modules takes a list of module paths, got {modules!r}")
    added: list[TaskSpec] = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"task module {module_name!r} cannot be imported: {err}") from err
        specs_of = getattr(module, "SPECS", None)
        if not isinstance(specs_of, list | tuple) or not all(
            isinstance(s, TaskSpec) for s in specs_of
        ):
            raise ValueError(f"task module {module_name!r} must define SPECS, a tuple of TaskSpec")
        added.extend(register(spec) for spec in specs_of)
    return added
