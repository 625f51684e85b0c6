import math

import pytest

from coordinator.staleness import constant, hinge, polynomial, staleness_weight


def test_constant_ignores_staleness():
    assert [constant(s) for s in (0, 1, 100)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("s, a, expected", [(0, 0.5, 1.0), (3, 0.5, 0.5), (8, 0.5, 1 / 3), (1, 1.0, 0.5), (4, 2.0, 1 / 25)])
def test_polynomial(s, a, expected):
    assert polynomial(s, a) == pytest.approx(expected)


@pytest.mark.parametrize("s, expected", [(0, 1.0), (4, 1.0), (5, 1 / (10 * 1 + 1)), (7, 1 / (10 * 3 + 1))])
def test_hinge_is_flat_then_decays(s, expected):
    assert hinge(s, a=10, b=4) == pytest.approx(expected)


def test_named_functions_bind_their_parameters():
    assert staleness_weight("polynomial", a=0.5)(3) == pytest.approx(0.5)
    assert staleness_weight("hinge", a=1.0, b=2)(4) == pytest.approx(1 / 3)
    assert staleness_weight("constant")(9) == 1.0
    with pytest.raises(ValueError, match="unknown staleness function 'cubic'"):
        staleness_weight("cubic")


def test_weights_decrease_and_stay_positive():
    for fn in (staleness_weight("polynomial", 0.5), staleness_weight("hinge", 0.5, 4)):
        weights = [fn(s) for s in range(200)]
        assert all(0 < w <= 1 for w in weights)
        assert all(a >= b for a, b in zip(weights, weights[1:]))
        assert not math.isclose(weights[-1], weights[0])
