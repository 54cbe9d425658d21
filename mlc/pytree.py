"""Arguments and results of traced functions are pytrees: arrays in tuples, lists and dicts. Other
leaves (numbers, strings, None) are static: kept in the structure, so they are part of a signature.
"""
from __future__ import annotations

import numpy as np

from .tensor import Tensor, Variable


def is_array(x) -> bool:
    return isinstance(x, (np.ndarray, Tensor, Variable))


def flatten(tree, leaves: list | None = None):
    """(array leaves, a hashable description of the structure with the static leaves in it)."""
    leaves = [] if leaves is None else leaves
    if is_array(tree):
        leaves.append(tree)
        return leaves, "*"
    if isinstance(tree, (tuple, list)):
        return leaves, (type(tree).__name__, tuple(flatten(t, leaves)[1] for t in tree))
    if isinstance(tree, dict):
        return leaves, ("dict", tuple(tree), tuple(flatten(t, leaves)[1] for t in tree.values()))
    if isinstance(tree, (np.generic,)):
        tree = tree.item()
    try:
        hash(tree)
    except TypeError:
        raise TypeError(f"cannot pass a {type(tree).__name__} to a traced function: arguments are arrays, "
                        f"numbers, strings, None, and tuples, lists and dicts of them") from None
    return leaves, ("static", tree)


def unflatten(structure, leaves):
    it = iter(leaves)

    def build(s):
        if s == "*":
            return next(it)
        kind = s[0]
        if kind == "static":
            return s[1]
        if kind == "dict":
            return dict(zip(s[1], (build(c) for c in s[2])))
        items = [build(c) for c in s[1]]
        return tuple(items) if kind == "tuple" else items
    return build(structure)


def count_leaves(structure) -> int:
    if structure == "*":
        return 1
    if structure[0] == "static":
        return 0
    return sum(count_leaves(c) for c in structure[-1])


def statics(structure):
    """The static leaves in a structure."""
    if structure == "*":
        return
    if structure[0] == "static":
        yield structure[1]
        return
    for c in structure[-1]:
        yield from statics(c)
