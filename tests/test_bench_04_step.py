"""benchmarks/bench_04_step.py drives 04's internals (PAD_TO, pad_rows, dp_sgd_step, ...): one
step per mode, so that a renamed function breaks this test rather than the README's numbers.
No assertion compares two timings: on a shared CI box any step can be slowed by other jobs."""
import importlib.util
import math
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = ROOT / "benchmarks" / "bench_04_step.py"
MODES = ["dp, unpadded", "dp, padded", "dp, fixed size", "non-private"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_04_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the script runs nothing on import
    return module


def test_bench_04_step_times_every_mode_and_prints_the_table():
    done = subprocess.run([sys.executable, str(BENCH), "--threads", "1", "--repeats", "1",
                           "--steps", "1", "--warmup", "0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    batch = int(done.stdout.split("expected batch qN = ")[1].split(",")[0])
    rows = [line.strip("| ").split(" | ") for line in done.stdout.splitlines()
            if line.startswith("| ") and "ms per step" not in line]
    assert [r[0] for r in rows] == MODES
    assert [r[1] for r in rows] == ["1"] * 4
    ms, per_s, ratio = ([float(r[i]) for r in rows] for i in (2, 3, 4))
    for i, mode in enumerate(MODES):
        assert math.isfinite(ms[i]) and ms[i] > 0, mode  # a step that was really timed
        # examples/s is qN per step and the ratio is to the non-private row (both from the
        # unrounded times; the table rounds ms to 1)
        assert per_s[i] == pytest.approx(1e3 * batch / ms[i], rel=0.02, abs=1), mode
        assert ratio[i] == pytest.approx(ms[i] / ms[-1], rel=0.02, abs=0.01), mode


def test_table_has_one_row_per_mode_and_thread_count_with_ratios_at_the_same_count():
    bench = load_bench()
    assert list(bench.MODES) == MODES
    seconds = {("dp, unpadded", 1): 0.5, ("dp, padded", 1): 0.4, ("dp, fixed size", 1): 0.3,
               ("non-private", 1): 0.1, ("dp, unpadded", 2): 0.3, ("dp, padded", 2): 0.24,
               ("dp, fixed size", 2): 0.2, ("non-private", 2): 0.08}
    # three repeats each; the median ignores the slow outlier
    results = {key: [{"seconds": s, "mb": 100.0}, {"seconds": 9.0, "mb": 300.0},
                     {"seconds": s, "mb": 200.0}] for key, s in seconds.items()}
    rows = bench.table_rows(results, batch=250)
    assert [(r[0], r[1]) for r in rows] == [(m, t) for t in (1, 2) for m in MODES]
    for mode, threads, ms, per_s, ratio, mb in rows:
        s = seconds[mode, threads]
        assert ms == pytest.approx(1e3 * s) and per_s == pytest.approx(250 / s)
        assert ratio == pytest.approx(s / seconds["non-private", threads])
        assert mb == 200.0
