"""The run log's summary curve: bounded in memory, exact where the summary reads it."""

import itertools
import math
import random

from coordinator.runlog import Curve, RunLog, time_to_accuracy


def learning_curve(n: int, seed: int = 0) -> list[tuple[float, int, float, float]]:
    """A noisy rising accuracy on a test set of 360 samples, one point per version."""
    rng = random.Random(seed)
    points = []
    for version in range(n):
        accuracy = min(1.0, max(0.0, 0.95 * (1 - math.exp(-version / (n / 8))) + rng.gauss(0, 0.03)))
        points.append((version * 0.1, version, round(accuracy * 360) / 360, 1 - accuracy))
    return points


def test_a_long_curve_is_kept_within_its_limit_and_still_answers_every_time_to_accuracy_exactly():
    full = learning_curve(50_000)
    curve = Curve(limit=500)
    for point in full:
        curve.add(point)
    kept = curve.points
    best, records = -1.0, 0
    for point in full:
        records, best = records + (point[2] > best), max(best, point[2])
    assert len(kept) <= 500 + records + 1 < len(full) / 50
    assert kept == sorted(kept) and kept[0] == full[0] and kept[-1] == full[-1], "oldest first, first and last"
    for threshold in [i / 100 for i in range(101)]:
        assert time_to_accuracy(kept, threshold) == time_to_accuracy(full, threshold), threshold
    assert curve.best == max(p[2] for p in full) and curve.last == full[-1]
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(kept)]
    assert max(gaps) <= 2 * 50_000 / 500, "the points left are spread over the whole run"


def test_a_short_curve_is_kept_whole_and_nan_is_never_the_best():
    points = [(0.0, 0, float("nan"), 2.3), (1.0, 1, 0.5, 1.0), (2.0, 2, 0.4, 1.1), (3.0, 3, float("nan"), 1.2)]
    curve = Curve()
    for point in points:
        curve.add(point)
    assert curve.points == points and curve.best == 0.5 and curve.last is points[-1]


def test_the_summary_reads_the_curve_final_and_best_accuracy_and_the_milestones(tmp_path):
    runlog = RunLog(tmp_path)
    for version, accuracy in enumerate([0.3, 0.91, 0.85, 0.96, 0.94]):
        runlog.evaluation(version, {"accuracy": accuracy, "loss": 1 - accuracy})
    summary = runlog.summary()
    runlog.close()
    assert [point[2] for point in summary["curve"]] == [0.3, 0.91, 0.85, 0.96, 0.94]
    assert summary["final_accuracy"] == 0.94 and summary["best_accuracy"] == 0.96
    assert summary["time_to_accuracy"]["0.90"] == summary["curve"][1][0]
    assert summary["time_to_accuracy"]["0.95"] == summary["curve"][3][0]
