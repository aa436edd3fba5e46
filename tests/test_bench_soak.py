"""The soak's verdict (bench/soak.py): growth that goes on is told from memory taken once."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.soak import GROWTH_LIMIT_KB_PER_MINUTE, ProcessSeries, largest_step, stretch_lows, summarise

SAMPLE_SECONDS = 10
WARM_UP_SECONDS = 300


def series(rss_at: Callable[[float], float], minutes: int = 45) -> ProcessSeries:
    """Samples every 10 s after the warm-up; RSS from ``rss_at(seconds)``, CPU ticks constant."""
    process = ProcessSeries("worker 1", 4242)
    for n in range(WARM_UP_SECONDS // SAMPLE_SECONDS, (WARM_UP_SECONDS + minutes * 60) // SAMPLE_SECONDS):
        t = n * SAMPLE_SECONDS
        process.samples.append((float(t), int(rss_at(t)), 100))
    return process


def test_a_steady_leak_grows_on_both_sides_of_any_split() -> None:
    summary = summarise(series(lambda t: 80_000 + 3 * t / 60), WARM_UP_SECONDS)
    assert summary["slope_kb_per_minute"] == pytest.approx(3.0, abs=0.05)
    assert summary["largest_step"]["slope_before_kb_per_minute"] > GROWTH_LIMIT_KB_PER_MINUTE
    assert summary["grows"]


def test_one_step_between_two_flat_stretches_is_reported_and_not_growth() -> None:
    step_at = WARM_UP_SECONDS + 25 * 60
    summary = summarise(series(lambda t: 85_000 + (940 if t >= step_at else 0)), WARM_UP_SECONDS)
    assert summary["slope_kb_per_minute"] > GROWTH_LIMIT_KB_PER_MINUTE  # the plain slope would say "grows"
    assert summary["largest_step"] == {
        "at_minute": step_at / 60,
        "size_kb": 940,
        "slope_before_kb_per_minute": 0.0,
        "slope_after_kb_per_minute": 0.0,
    }
    assert not summary["grows"]


def test_a_step_on_top_of_a_leak_still_grows() -> None:
    step_at = WARM_UP_SECONDS + 20 * 60
    summary = summarise(series(lambda t: 85_000 + 5 * t / 60 + (940 if t >= step_at else 0)), WARM_UP_SECONDS)
    assert summary["largest_step"]["size_kb"] == pytest.approx(940, abs=5)
    assert summary["grows"]


def test_a_flat_process_does_not_grow() -> None:
    summary = summarise(series(lambda t: 43_664), WARM_UP_SECONDS)
    assert summary["slope_kb_per_minute"] == 0.0
    assert not summary["grows"]


def test_no_step_is_fitted_in_a_window_too_short_for_two_sides() -> None:
    points = [(float(t), 1.0) for t in range(0, 8 * 60, SAMPLE_SECONDS)]
    assert largest_step(points) is None


def test_the_lows_of_a_sawtooth_that_comes_back_to_its_plateau_are_flat() -> None:
    # A page cache that fills by 1,500 kB over 4 minutes and is dropped: the plain slope moves
    # with where the window cuts the teeth, the lowest sample of each 5 minutes does not.
    summary = summarise(series(lambda t: 85_000 + 1_500 * ((t % 240) / 240)), WARM_UP_SECONDS)
    assert len(summary["five_minute_lows_kb"]) == 8  # 44 min 50 s of samples
    assert set(summary["five_minute_lows_kb"]) == {85_000}
    assert summary["lows_slope_kb_per_minute"] == 0.0
    assert not summary["lows_grow"]


def test_the_lows_of_a_leak_under_a_sawtooth_grow() -> None:
    summary = summarise(series(lambda t: 85_000 + 3 * t / 60 + 1_500 * ((t % 240) / 240)), WARM_UP_SECONDS)
    assert summary["lows_slope_kb_per_minute"] == pytest.approx(3.0, abs=0.3)
    assert summary["lows_grow"]


def test_stretch_lows_leave_out_a_last_stretch_cut_short() -> None:
    points = [(float(t), float(1_000 - t)) for t in range(0, 14 * 60, SAMPLE_SECONDS)]
    assert stretch_lows(points) == [(0.0, 1_000.0 - 290), (300.0, 1_000.0 - 590)]
