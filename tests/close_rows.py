"""Compare CSV rows computed through different batchings, thread counts or backends.

Floats from different batch splits differ in their last bits (BLAS picks other kernels), so
numbers are equal within ``atol``; every other field must be the same text.
"""

from __future__ import annotations

import math


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def assert_rows_close(got: list[dict], expected: list[dict], key: str = "path", atol: float = 1e-5) -> None:
    """Rows matched by ``key``: the same keys and text fields, numbers within ``atol``."""
    by_key = {row[key]: row for row in expected}
    assert sorted(row[key] for row in got) == sorted(by_key), "the rows name other files"
    for row in got:
        other = by_key[row[key]]
        assert list(row) == list(other), f"{row[key]}: other columns"
        for column, text in row.items():
            a, b = _number(text), _number(other[column])
            if a is not None and b is not None:
                assert abs(a - b) <= atol, f"{row[key]} {column}: {text} vs {other[column]}"
            else:
                assert text == other[column], f"{row[key]} {column}: {text!r} vs {other[column]!r}"
