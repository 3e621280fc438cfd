"""Warm-up (linear from 0) -> hold -> cosine decay to 0."""

from __future__ import annotations

import pytest


def test_shape_of_the_schedule(tf):
    from inspectd.toolkit.schedule import WarmupHoldCosine

    s = WarmupHoldCosine(1e-3, total_steps=1000, warmup=0.15, hold=0.10)
    lr = lambda step: float(s(step))  # noqa: E731
    assert lr(0) == 0.0
    assert lr(75) == pytest.approx(0.5e-3)
    assert lr(150) == pytest.approx(1e-3) and lr(249) == pytest.approx(1e-3)
    assert lr(625) == pytest.approx(0.5e-3, rel=1e-3)  # half-way through the cosine
    assert lr(1000) == pytest.approx(0.0, abs=1e-9)
    values = [lr(i) for i in range(250, 1001, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert WarmupHoldCosine.from_config(s.get_config()).get_config() == s.get_config()
