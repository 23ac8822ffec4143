"""Anti-entropy's idle back-off (`meshnode.core.neighbours.Cadence`, rule N5)."""

from __future__ import annotations

import math

import pytest

from meshnode.core.neighbours import Cadence


def test_quiet_exchanges_double_the_interval_up_to_idle() -> None:
    c = Cadence(1.0, 8.0)
    assert c.interval == 1.0
    assert [c.quiet() for _ in range(5)] == [2.0, 4.0, 8.0, 8.0, 8.0]


def test_anything_busy_returns_to_base_at_once() -> None:
    c = Cadence(1.0, 8.0)
    for _ in range(4):
        c.quiet()
    assert c.busy() == 1.0
    assert c.interval == 1.0
    assert c.quiet() == 2.0


def test_idle_equal_to_base_never_backs_off() -> None:
    c = Cadence(1.0, 1.0)
    assert c.quiet() == 1.0


@pytest.mark.parametrize(("base", "idle"), [(0.0, 1.0), (2.0, 1.0), (1.0, math.inf), (-1.0, 1.0)])
def test_bad_periods_are_refused(base: float, idle: float) -> None:
    with pytest.raises(ValueError, match="base <= idle"):
        Cadence(base, idle)
