"""Staleness weights: how much an update counts when its base is ``s`` versions behind.

The three families of FedAsync (Xie et al., 2019). Each maps s >= 0 to a weight in (0, 1] with
s(0) = 1, so a fresh update always counts fully. A function takes the staleness and, by name, the
parameters it uses of ``a`` (FEDQ_STALENESS_A) and ``b`` (FEDQ_STALENESS_B); registering it in
``STALENESS`` makes it a choice of FEDQ_STALENESS.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from shared.registry import Registry

StalenessWeight = Callable[[int], float]

STALENESS: Registry[Callable[..., float]] = Registry("staleness function")


@STALENESS.register("constant")
def constant(staleness: int) -> float:
    """Every update counts the same, however old its base."""
    return 1.0


@STALENESS.register("polynomial")
def polynomial(staleness: int, a: float) -> float:
    """(1 + s)^-a: a smooth decay; a = 0.5 is FedAsync's usual choice."""
    return (1.0 + staleness) ** -a


@STALENESS.register("hinge")
def hinge(staleness: int, a: float, b: int) -> float:
    """Full weight up to b versions behind, then 1 / (a (s - b) + 1)."""
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


def staleness_weight(kind: str, a: float = 0.5, b: int = 4) -> StalenessWeight:
    """The weight function named by a setting, with the parameters it takes bound."""
    function = STALENESS[kind]
    given = {"a": a, "b": b}
    takes = list(inspect.signature(function).parameters)[1:]
    return functools.partial(function, **{name: given[name] for name in takes})
