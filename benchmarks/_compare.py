"""Ours against an anchor on the same inputs, timed by pytest-benchmark.

A bench module describes each benchmark group as a :class:`Case`: the inputs' shape, our function
and its anchors (the established implementation, or the path ours replaces), each a
zero-argument callable on inputs built once in a module-scoped fixture. One test per group is
parametrized over the case's method names and calls :func:`time_method`::

    @pytest.fixture(scope="module")
    def rotated_pairs(boxes):
        a, b = boxes
        return Case("rotated iou_pairs", f"{len(a):,} pairs", {
            "ours": ours(lambda: geo.iou_pairs(a, b)),
            "shapely": anchor(lambda: shapely_iou(a, b)),
        }, close(atol=1e-9))

    @pytest.mark.parametrize("method", ["ours", "shapely"])
    def test_rotated_iou_pairs(benchmark, rotated_pairs, method):
        time_method(benchmark, rotated_pairs, method)

:func:`time_method` first calls the method once, untimed (Numba compilation, caches, lazy
imports), and checks that result against the reference anchor's (the case's first anchor) with
the case's ``agree``: a benchmark never times a wrong answer. Then pytest-benchmark times it, and
the JSON (``--benchmark-json``) carries in ``extra_info`` what ``report.py`` needs: the case (the
group, without its shape) and the shape, the method and its role (``ours`` / ``anchor``), the
largest absolute difference from the reference anchor's result, and the machine's load average
when the benchmark started. pytest-benchmark's group is ``"<case> [<shape>]"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import _provenance
import numpy as np

Role = Literal["ours", "anchor"]
_UNSET = object()  # Case._expected before the reference anchor has run


@dataclass(frozen=True)
class Method:
    """One timed callable. ``rounds`` fixes the number of timed calls (for calls of a second or
    more; ``None`` lets pytest-benchmark calibrate); ``setup`` runs before every timed call and
    outside the timing (e.g. clearing caches), which needs fixed ``rounds``."""

    fn: Callable[[], object]
    role: Role
    rounds: int | None = None
    setup: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.role not in ("ours", "anchor"):
            raise ValueError(f"role must be 'ours' or 'anchor', got {self.role!r}")
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.setup is not None and self.rounds is None:
            raise ValueError("a method with a setup needs fixed rounds")

    def call(self) -> object:
        if self.setup is not None:
            self.setup()
        return self.fn()


def ours(fn: Callable[[], object], rounds: int | None = None,
         setup: Callable[[], None] | None = None) -> Method:
    return Method(fn, "ours", rounds, setup)


def anchor(fn: Callable[[], object], rounds: int | None = None) -> Method:
    return Method(fn, "anchor", rounds)


@dataclass
class Case:
    """One benchmark group: the case ``name`` at ``shape``, its ``methods`` (name -> Method, at
    least one of each role) on the same inputs. ``agree(got, expected)`` returns the largest
    absolute difference between two results and raises ``AssertionError`` when they disagree."""

    name: str
    shape: str
    methods: dict[str, Method]
    agree: Callable[[object, object], float]
    _expected: object = field(default=_UNSET, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        roles = {m.role for m in self.methods.values()}
        if roles != {"ours", "anchor"}:
            raise ValueError(f"{self.name}: needs ours and at least one anchor, got {roles}")

    @property
    def reference(self) -> str:
        """The method every other one is checked against: the first anchor."""
        return next(name for name, m in self.methods.items() if m.role == "anchor")

    def expected(self) -> object:
        """The reference anchor's result, computed on first use only."""
        if self._expected is _UNSET:
            self._expected = self.methods[self.reference].call()
        return self._expected


def time_method(benchmark, case: Case, name: str) -> None:
    """Check ``case.methods[name]`` against the reference anchor, then time it with
    pytest-benchmark's ``benchmark`` fixture (see the module docstring)."""
    if name not in case.methods:
        raise KeyError(f"{case.name}: no method {name!r} (have {sorted(case.methods)})")
    method = case.methods[name]
    benchmark.group = f"{case.name} [{case.shape}]"
    benchmark.extra_info.update(case=case.name, shape=case.shape, method=name, role=method.role,
                                load=_provenance.load())
    if name == case.reference:
        case.expected()  # the warm-up call, and the result the others are checked against
    else:
        got = method.call()
        try:
            diff = case.agree(got, case.expected())
        except AssertionError as err:
            raise AssertionError(f"{case.name}: {name} disagrees with {case.reference}: "
                                 f"{err}") from None
        benchmark.extra_info["max_abs_diff"] = diff
    if method.rounds is None:
        benchmark(method.fn)
    else:
        benchmark.pedantic(method.fn, setup=method.setup, rounds=method.rounds, iterations=1)


# --------------------------------------------------------------------------- agreement checks


def _leaves(value: object) -> list[np.ndarray]:
    """The numbers in a result (arrays, tensors, scalars, nested in tuples / lists) as float64
    arrays."""
    if isinstance(value, (tuple, list)) and not (value and np.isscalar(value[0])):
        return [leaf for item in value for leaf in _leaves(item)]
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed for the rewards
        value = value.detach().double().cpu().numpy()
    return [np.asarray(value, dtype=np.float64)]


def close(rtol: float = 0.0, atol: float = 0.0) -> Callable[[object, object], float]:
    """``agree`` for numeric results: every leaf has the expected shape and
    ``max|got - expected| <= atol + rtol * max|expected|`` (relative to the leaf's largest
    magnitude: gradients span many scales). NaNs must sit in the same places."""

    def agree(got: object, expected: object) -> float:
        got_leaves, want_leaves = _leaves(got), _leaves(expected)
        if len(got_leaves) != len(want_leaves):
            raise AssertionError(f"{len(got_leaves)} outputs, expected {len(want_leaves)}")
        worst = 0.0
        for k, (a, b) in enumerate(zip(got_leaves, want_leaves, strict=True)):
            if a.shape != b.shape:
                raise AssertionError(f"output {k}: shape {a.shape}, expected {b.shape}")
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                raise AssertionError(f"output {k}: NaNs in different places")
            finite = ~np.isnan(b)
            if not finite.any():
                continue
            err = float(np.max(np.abs(a[finite] - b[finite])))
            bound = atol + rtol * float(np.max(np.abs(b[finite])))
            if err > bound:
                raise AssertionError(f"output {k}: max abs difference {err:.3e} > {bound:.3e}")
            worst = max(worst, err)
        return worst

    return agree


def equal(key: Callable[[object], Sequence] = list) -> Callable[[object, object], float]:
    """``agree`` for exact results (records, strings): ``key(got) == key(expected)``; 0.0."""

    def agree(got: object, expected: object) -> float:
        a, b = key(got), key(expected)
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                         min(len(a), len(b)))
            raise AssertionError(f"results differ first at item {first} "
                                 f"({len(a)} vs {len(b)} items)")
        return 0.0

    return agree
