"""bench/common.py's median_interval: the bootstrap interval the step benchmark prints
beside each ratio."""
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from common import median_interval  # noqa: E402


def test_interval_holds_the_median_and_is_repeatable():
    rng = random.Random(1)
    values = [1.0 + rng.gauss(0, 0.05) for _ in range(101)]
    low, high = median_interval(values)
    assert low < statistics.median(values) < high
    assert (low, high) == median_interval(values)
    # The median of 101 N(1, 0.05) draws has a standard error of ~0.05·1.25/√101 ≈ 0.0062:
    # a 95% interval about ±0.012 wide on each side.
    assert 0.005 < statistics.median(values) - low < 0.025 and 0.005 < high - statistics.median(values) < 0.025


def test_interval_narrows_with_more_rounds_and_is_a_point_without_spread():
    rng = random.Random(2)
    few = [rng.gauss(1, 0.05) for _ in range(21)]
    many = [rng.gauss(1, 0.05) for _ in range(401)]
    assert median_interval(many)[1] - median_interval(many)[0] < median_interval(few)[1] - median_interval(few)[0]
    assert median_interval([1.03] * 9) == (1.03, 1.03)
