"""benchmarks/ablation.py --quick: the README's ablation table and figure are regenerated end
to end (through 04's command line, on synthetic data the script writes), and every eps in the
table is the one its run's accountant reports, within the calibration tolerance."""
import json
import subprocess
import sys

from conftest import ROOT


def test_ablation_quick_writes_its_table_and_figure(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "ablation.md").read_text()
    assert "same steps and batch" in table and "same steps and compute" in table and "FD-proxy" in table
    assert (tmp_path / "04_ablation.png").stat().st_size > 0
    runs = [d for d in tmp_path.iterdir() if (d / "metrics.json").exists()]
    assert runs
    for run in runs:  # each run spent its eps, never more (calibration to 1e-4 relative, from below)
        r = json.loads((run / "metrics.json").read_text())["dp_release"]
        assert 0.99 * r["eps_target"] <= r["eps_spent"] <= r["eps_target"]
