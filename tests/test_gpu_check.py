"""benchmarks/gpu_check.py is run on a GPU only rarely and under a short time limit, so its
whole path is rehearsed here on the CPU with toy sizes (--quick): the smoke run with a real
Ctrl-C and --resume, the step timings, the projections, the short training and the report."""
import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_quick_dry_run_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["smoke"]["ok"] and r["smoke"]["interrupt_exit_code"] == 130
    assert r["smoke"]["eps_reported"] == r["smoke"]["eps_recomputed"] <= r["smoke"]["eps_target"]
    for t in r["timings"]:
        assert t["preset"] in ("paper", "gpu") and all(row["dp_s_per_step"] > 0 for row in t["rows"])
    assert set(r["projections"]) == {"paper", "gpu"} and r["training"]["exit_code"] == 0
    assert {"logreg", "mlp", "cnn"} <= set(r["training"])
    assert "projected wall time" in (tmp_path / "gpu_check.md").read_text()
