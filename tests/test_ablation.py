"""benchmarks/ablation.py --quick (and --quick --sweep): the README's ablation and privacy-utility
tables and figures are regenerated end to end (through 04's command line, on synthetic data the
script writes), and every eps in them is the one its run's accountant reports, within the
calibration tolerance."""
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

    # --model: (c) alone, on a model trained elsewhere (here: the K = 1 run above); no training
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--quick", "--model",
                           str(tmp_path / "a_K1" / "model.pt"), "--out", str(tmp_path / "c_only")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "c_only" / "ablation.md").read_text()
    assert "same steps" not in table and table.count("| churn 4") == 1 and "as trained" in table
    assert not any((d / "metrics.json").exists() and (d / "PRIVATE_resume_state.pt").exists()
                   for d in (tmp_path / "c_only").iterdir())


def test_sweep_quick_reports_each_runs_own_eps(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--quick", "--sweep",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "04_privacy_utility.png").stat().st_size > 0
    rows = [line.split("|")[1:-1] for line in (tmp_path / "sweep.md").read_text().splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    # eps {0.2, 1, 10} x (K = 1, K = 4, K = 1 with 4x the steps)
    assert sorted((float(r[0]), r[2].strip()) for r in rows) == sorted(
        (e, k) for e in (0.2, 1, 10) for k in ("K = 1", "K = 4", "K = 1, 4x steps (compute of K = 4)"))
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    for row, (name, r) in zip(rows, runs.items(), strict=True):  # both in the sweep's order
        m = json.loads((tmp_path / name / "metrics.json").read_text())["dp_release"]
        assert m["eps_target"] == r["eps_target"] == float(row[0])  # the run was calibrated to the row's eps ...
        assert 0.99 * m["eps_target"] <= m["eps_spent"] <= m["eps_target"]  # ... and spent it, never more
        assert row[1].strip() == f"{m['eps_spent']:.4f}"  # ... and the table shows what it spent
    # K = 1 with 4x the steps spends the same eps with a larger noise multiplier
    for e in ("0.2", "1", "10"):
        assert runs[f"eps{e}_K1_x4"]["noise_multiplier"] > runs[f"eps{e}_K1"]["noise_multiplier"]
        assert runs[f"eps{e}_K4"]["noise_multiplier"] == runs[f"eps{e}_K1"]["noise_multiplier"]
