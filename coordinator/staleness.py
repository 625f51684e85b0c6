"""Staleness weights: how much an update counts when its base is ``s`` versions behind.

The three families of FedAsync (Xie et al., 2019). Each maps s >= 0 to a weight in (0, 1] with
s(0) = 1, so a fresh update always counts fully.
"""

from __future__ import annotations

from typing import Callable

StalenessWeight = Callable[[int], float]


def constant(staleness: int) -> float:
    """Every update counts the same, however old its base."""
    return 1.0


def polynomial(staleness: int, a: float) -> float:
    """(1 + s)^-a: a smooth decay; a = 0.5 is FedAsync's usual choice."""
    return (1.0 + staleness) ** -a


def hinge(staleness: int, a: float, b: int) -> float:
    """Full weight up to b versions behind, then 1 / (a (s - b) + 1)."""
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


def staleness_weight(kind: str, a: float = 0.5, b: int = 4) -> StalenessWeight:
    """The weight function named by a setting, with its parameters bound."""
    if kind == "constant":
        return constant
    if kind == "polynomial":
        return lambda s: polynomial(s, a)
    if kind == "hinge":
        return lambda s: hinge(s, a, b)
    raise ValueError(f"unknown staleness function {kind!r}; choose constant, polynomial or hinge")
