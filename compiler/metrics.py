"""Per-sample fidelity of one output against a reference: the one measure that the `auto`
precision budget, the INT8 budget and the verify stage share (so it lives below all of them).
"""

from __future__ import annotations

import numpy as np


def _valid(x: np.ndarray, i: int, length: int) -> np.ndarray:
    """Sample i's values at its `length` valid positions ((batch, sequence, ...) or (batch, ...))."""
    return x[i, :length] if x.ndim >= 3 else x[i]


def sample_fidelity(ref: np.ndarray, got: np.ndarray, i: int, length: int) -> tuple[float, int, float]:
    """(cosine, non-finite count, max abs error) of sample `i` of one output at its valid positions.

    A sample with a non-finite value scores cosine -1 and max error nan; a zero vector matches
    only a zero vector.
    """
    g = _valid(got, i, length).astype(np.float64).ravel()
    r = _valid(ref, i, length).astype(np.float64).ravel()
    bad = g.size - int(np.count_nonzero(np.isfinite(g)))
    if bad:
        return -1.0, bad, float("nan")
    denom = np.linalg.norm(g) * np.linalg.norm(r)
    cosine = float(g @ r / denom) if denom else float(np.array_equal(g, r))
    return cosine, 0, float(np.max(np.abs(g - r))) if g.size else 0.0
