"""Numba matching kernels on one dense score matrix.

* ``hungarian(cost, n, m, ...)``: optimal assignment minimising the total cost of an ``[n, m]``
  block (``n <= m``; every row assigned) by shortest augmenting paths with potentials
  (Kuhn-Munkres in its O(n^2 m) form). Costs must be finite.
* ``greedy_pairs(score, n, m, threshold, ...)``: greedy matching by descending score: every pair
  with ``score >= threshold`` and ``score > 0`` is visited from the highest score down (ties in
  row-major order) and taken when its row and column are both free.

Both read the top-left ``[n, m]`` block of a larger buffer, so the batched reward kernels reuse one
allocation across candidates.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def hungarian(
    cost: np.ndarray,
    n: int,
    m: int,
    row_to_col: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    minv: np.ndarray,
    owner: np.ndarray,
    way: np.ndarray,
    used: np.ndarray,
) -> None:
    """Fill ``row_to_col[:n]`` with the optimal assignment of ``cost[:n, :m]`` (``n <= m``).

    Workspaces: ``u`` ``[>= n + 1]``, ``v`` / ``minv`` ``[>= m + 1]`` float64, ``owner`` / ``way``
    ``[>= m + 1]`` int64, ``used`` ``[>= m + 1]`` bool. Index 0 of the column arrays is a virtual
    column that starts every augmenting path (1-based rows and columns inside).
    """
    inf = np.inf
    for k in range(n + 1):
        u[k] = 0.0
    for k in range(m + 1):
        v[k] = 0.0
        owner[k] = 0
        way[k] = 0
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        for k in range(m + 1):
            minv[k] = inf
            used[k] = False
        while True:
            used[j0] = True
            i0 = owner[j0]
            delta = inf
            j1 = 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if reduced < minv[j]:
                        minv[j] = reduced
                        way[j] = j0
                    if minv[j] < delta:
                        delta = minv[j]
                        j1 = j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0 != 0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    for j in range(1, m + 1):
        if owner[j] != 0:
            row_to_col[owner[j] - 1] = j - 1


@numba.njit(cache=True)
def linear_assignment_kernel(cost: np.ndarray) -> np.ndarray:
    """``row_to_col`` ``[n]`` minimising ``cost`` ``[n, m]``, ``n <= m``."""
    n, m = cost.shape
    row_to_col = np.empty(n, dtype=np.int64)
    hungarian(
        cost,
        n,
        m,
        row_to_col,
        np.empty(n + 1),
        np.empty(m + 1),
        np.empty(m + 1),
        np.empty(m + 1, dtype=np.int64),
        np.empty(m + 1, dtype=np.int64),
        np.empty(m + 1, dtype=np.bool_),
    )
    return row_to_col


@numba.njit(cache=True)
def greedy_pairs(
    score: np.ndarray,
    n: int,
    m: int,
    threshold: float,
    rows_out: np.ndarray,
    cols_out: np.ndarray,
    row_taken: np.ndarray,
    col_taken: np.ndarray,
) -> int:
    """Greedy matching of ``score[:n, :m]``: writes the pairs in selection order and returns
    their count. ``rows_out`` / ``cols_out`` need ``min(n, m)`` entries, ``row_taken`` ``n``,
    ``col_taken`` ``m``."""
    count = 0
    for i in range(n):
        for j in range(m):
            s = score[i, j]
            if s >= threshold and s > 0.0:
                count += 1
    if count == 0:
        return 0
    vals = np.empty(count)
    flat = np.empty(count, dtype=np.int64)
    k = 0
    for i in range(n):
        for j in range(m):
            s = score[i, j]
            if s >= threshold and s > 0.0:
                vals[k] = -s
                flat[k] = i * m + j
                k += 1
    order = np.argsort(vals, kind="mergesort")
    for i in range(n):
        row_taken[i] = False
    for j in range(m):
        col_taken[j] = False
    matched = 0
    limit = min(n, m)
    for t in range(count):
        idx = flat[order[t]]
        i, j = idx // m, idx % m
        if row_taken[i] or col_taken[j]:
            continue
        row_taken[i] = True
        col_taken[j] = True
        rows_out[matched] = i
        cols_out[matched] = j
        matched += 1
        if matched == limit:
            break
    return matched


@numba.njit(cache=True)
def greedy_match_kernel(score: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    n, m = score.shape
    limit = min(n, m)
    rows = np.empty(limit, dtype=np.int64)
    cols = np.empty(limit, dtype=np.int64)
    count = greedy_pairs(
        score, n, m, threshold, rows, cols, np.empty(n, np.bool_), np.empty(m, np.bool_)
    )
    return rows[:count].copy(), cols[:count].copy()
