"""Typed views of MLX calls whose stubs return wide unions.

MLX's stubs type ``array.item()`` as ``int | float | complex``, ``array.tolist()`` as a
nested list-or-scalar, ``tree_flatten`` as a list *or* a dict and ``mx.load`` as an array, a
dict or a (dict, metadata) pair. Which member a call returns follows from the array's dtype
and shape or from the call's arguments, which the type checker cannot see; these helpers
state it once, and check it at run time where the check is free.
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten

__all__ = ["flat_items", "int_list", "item_float", "item_int"]


def item_int(a: mx.array) -> int:
    """The value of a one-element integer (or bool) array as a Python ``int``."""
    value = a.item()
    if isinstance(value, complex):
        raise TypeError("expected a real-valued array, got a complex one")
    return int(value)


def item_float(a: mx.array) -> float:
    """The value of a one-element real array as a Python ``float``."""
    value = a.item()
    if isinstance(value, complex):
        raise TypeError("expected a real-valued array, got a complex one")
    return float(value)


def int_list(a: mx.array) -> list[int]:
    """The values of a 1-d integer array as ``list[int]`` (``tolist`` of such an array)."""
    values = a.tolist()
    if not isinstance(values, list):
        raise TypeError("expected a 1-d array, got a scalar")
    return cast("list[int]", values)


def flat_items(tree: Any) -> list[tuple[str, Any]]:
    """``tree_flatten(tree)`` as the (dotted key, leaf) list it is without ``destination``."""
    flat = tree_flatten(tree)
    assert isinstance(flat, list)  # only a `destination` dict makes it return a dict
    return flat
