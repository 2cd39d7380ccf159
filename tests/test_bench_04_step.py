"""benchmarks/bench_04_step.py drives 04's internals (PAD_TO, pad_rows, dp_sgd_step, ...): one
step per mode, so that a renamed function breaks this test rather than the README's numbers."""
import subprocess
import sys

from conftest import ROOT


def test_bench_04_step_runs_every_mode_and_prints_the_table():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_04_step.py"), "--repeats", "1",
                           "--steps", "1", "--warmup", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms per step" not in line]
    modes = [r.split(" | ")[0][2:] for r in rows]
    assert modes == ["dp, unpadded", "dp, padded", "dp, fixed 250", "non-private"]
    assert rows[-1].split(" | ")[2] == "1.00"  # the non-private step is the unit
