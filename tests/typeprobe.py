"""The ``apply_func`` behind tests/test_types_doc.py: it describes what it received.

Kept out of the test module so that Ray pickles it by reference (``tests.typeprobe.describe``)
without making the actors import pytest.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def describe_array(a: np.ndarray) -> str:
    """``float64 (rows, 3)``; object arrays add the type of their items: ``object (rows,) of str``.

    >>> describe_array(np.zeros((5, 3), np.float32))
    'float32 (rows, 3)'
    >>> describe_array(np.array(["a", "b"], dtype=object))
    'object (rows,) of str'
    """
    shape = ", ".join(["rows", *(str(d) for d in a.shape[1:])])
    text = f"{a.dtype} ({shape}{',' if a.ndim == 1 else ''})"
    if a.dtype == object and a.size:
        text += f" of {type(a.flat[0]).__name__}"
    return text


def describe(model: Any, *columns: np.ndarray) -> np.ndarray:
    """``string``: for every row, what each argument looked like (``; `` between arguments)."""
    text = "; ".join(describe_array(c) for c in columns)
    return np.array([text] * len(columns[0]), dtype=object)
