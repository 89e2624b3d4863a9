"""bench/common.py's bootstrap_interval: the interval the step and inference benchmarks
print beside each ratio; bench_inference's fastest-vs-fastest verdict."""
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from common import bootstrap_interval  # noqa: E402


def test_interval_holds_the_median_and_is_repeatable():
    rng = random.Random(1)
    values = [1.0 + rng.gauss(0, 0.05) for _ in range(101)]
    low, high = bootstrap_interval(values)
    assert low < statistics.median(values) < high
    assert (low, high) == bootstrap_interval(values)
    # The median of 101 N(1, 0.05) draws has a standard error of ~0.05·1.25/√101 ≈ 0.0062:
    # a 95% interval about ±0.012 wide on each side.
    assert 0.005 < statistics.median(values) - low < 0.025 and 0.005 < high - statistics.median(values) < 0.025


def test_interval_narrows_with_more_rounds_and_is_a_point_without_spread():
    rng = random.Random(2)
    few = [rng.gauss(1, 0.05) for _ in range(21)]
    many = [rng.gauss(1, 0.05) for _ in range(401)]
    assert bootstrap_interval(many)[1] - bootstrap_interval(many)[0] < bootstrap_interval(few)[1] - bootstrap_interval(few)[0]
    assert bootstrap_interval([1.03] * 9) == (1.03, 1.03)


def test_interval_of_a_ratio_of_medians_over_paired_rounds():
    rng = random.Random(3)
    # Dense 1.7x slower than the model in each round, give or take 2%, on a drifting machine.
    rounds = [(1.7 * d * (1 + rng.gauss(0, 0.02)), d) for d in (1.0 + rng.gauss(0, 0.1) for _ in range(61))]
    ratio = statistics.median(a for a, _ in rounds) / statistics.median(b for _, b in rounds)
    low, high = bootstrap_interval(rounds, lambda rs: statistics.median(a for a, _ in rs) / statistics.median(b for _, b in rs))
    assert low < ratio < high and 1.6 < low and high < 1.8


def test_inference_verdict_compares_fastest_deployment_with_fastest():
    # bench_inference.fastest: rounds of (dense prepared, dense compiled, model prepared,
    # model compiled); each model's lower median against the other's.
    from bench_inference import fastest

    rng = random.Random(4)

    def rounds(dense, model):
        return [tuple(t * (1 + rng.gauss(0, 0.01)) for t in dense + model) for _ in range(41)]

    # Compiled is the faster deployment for both: 6 / 4.
    assert abs(fastest(rounds((10.0, 6.0), (5.0, 4.0))) - 1.5) < 0.03
    # Each model's fastest is a different deployment: 6 (dense prepared) / 3 (model compiled).
    assert abs(fastest(rounds((6.0, 10.0), (5.0, 3.0))) - 2.0) < 0.04
    # One deployment only (no compiler): the plain ratio of medians.
    assert abs(fastest(rounds((8.0,), (5.0,))) - 1.6) < 0.03
