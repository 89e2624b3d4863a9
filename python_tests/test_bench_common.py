"""bench/common.py's bootstrap_interval: the interval the step and inference benchmarks
print beside each ratio; interleaved_turns, which times them; bench_inference's
fastest-vs-fastest verdict; the argument checks of gpu_queued_times (GPU timing) and
bench_devices / result_name (which device's tables go to which file)."""
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from common import (bench_devices, bootstrap_interval, gpu_queued_times, interleaved_times,  # noqa: E402
                    interleaved_turns, result_name)

import pytest  # noqa: E402
import torch  # noqa: E402


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


def test_turns_time_each_call_back_to_back_in_a_shuffled_order():
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    turns = interleaved_turns(fns, repeats=5, device=torch.device("cpu"), calls=3, warmup=2)
    assert set(turns) == set("abc")
    assert all(len(t) == 5 and all(len(calls) == 3 and all(s >= 0 for s in calls) for calls in t)
               for t in turns.values())
    timed = log[6:]  # after 2 warm-up calls each
    assert log[:6] == list("aabbcc") and len(timed) == 45
    # Each turn's three calls run back to back, every fn once per round.
    rounds = [timed[i:i + 9] for i in range(0, 45, 9)]
    assert all(r[0::3] == r[1::3] == r[2::3] and sorted(r[0::3]) == list("abc") for r in rounds)
    assert len({"".join(r[0::3]) for r in rounds}) > 1  # the order is shuffled per round


def test_times_are_one_call_turns_in_the_same_order():
    log_times, log_turns = [], []
    times = interleaved_times({n: (lambda n=n: log_times.append(n)) for n in "xyz"}, 7, torch.device("cpu"))
    interleaved_turns({n: (lambda n=n: log_turns.append(n)) for n in "xyz"}, 7, torch.device("cpu"), calls=1)
    assert log_times == log_turns
    assert all(len(v) == 7 and all(isinstance(s, float) for s in v) for v in times.values())


def test_turns_reject_a_call_count_below_one_before_calling_anything():
    log = []
    for calls in (0, -1, 1.5, True):
        try:
            interleaved_turns({"a": lambda: log.append(1)}, 2, torch.device("cpu"), calls=calls)
        except ValueError as error:
            assert "calls" in str(error)
        else:
            raise AssertionError(f"calls={calls!r} accepted")
    assert log == []


def test_gpu_queued_times_refuses_the_cpu_and_bad_calls_before_calling_anything():
    calls = []
    fns = {"f": lambda: calls.append(1)}
    with pytest.raises(ValueError, match="CUDA device"):
        gpu_queued_times(fns, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="calls"):
        gpu_queued_times(fns, 3, torch.device("cuda"), calls=0)
    with pytest.raises(ValueError, match="repeats"):
        gpu_queued_times(fns, 0, torch.device("cuda"))
    assert calls == []


def test_bench_devices_and_result_names():
    assert bench_devices("cpu") == [torch.device("cpu")]
    expected = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    assert bench_devices("all") == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            bench_devices("cuda")
    with pytest.raises(ValueError, match="cpu, cuda or all"):
        bench_devices("gpu")
    # A CPU run never overwrites the committed GPU tables, nor the reverse.
    assert result_name("masked_ops", torch.device("cpu")) == "masked_ops.md"
    assert result_name("masked_ops", torch.device("cuda")) == "masked_ops-cuda.md"
