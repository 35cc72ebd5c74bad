"""FakeKommo's helpers for checking what a client sent."""

from __future__ import annotations

import pytest

from kommo_talks.testing import busiest_window


@pytest.mark.parametrize(
    ("times", "window", "busiest"),
    [
        ([], 1.0, 0),
        ([5.0], 1.0, 1),
        ([0.0, 0.5, 0.99, 1.0, 1.5], 1.0, 3),  # a request exactly a window later is not in it
        ([3.0, 0.0, 2.0, 1.0], 1.0, 1),  # unsorted input
        ([0.0, 0.1, 0.2, 0.3], 0.25, 3),
    ],
)
def test_busiest_window_counts_the_fullest_rolling_window(
    times: list[float], window: float, busiest: int
) -> None:
    assert busiest_window(times, window) == busiest
