"""Multi-process DP-SGD (torchrun, gloo on CPU) must be the single-process run, split: the
same Poisson batches, the same clipped sums, the DP noise added once, the same eps. Two CPU
processes are started exactly as a user would: python -m torch.distributed.run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_script
from test_04_dpdm_mnist import tiny_mnist

m = load_script("04_dpdm_mnist")
ARGS = ["--preset", "smoke", "--unverified", "--epochs", "4", "--no-eval"]  # 12 steps


def torchrun(*argv, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / "04_dpdm_mnist.py"), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, same flags."""
    base = tmp_path_factory.mktemp("dist")
    data = tiny_mnist(base / "data")
    m.main([*ARGS, "--data-dir", str(data), "--out", str(base / "single")])
    return data, torch.load(base / "single" / "ckpt.pt", weights_only=False)


def assert_same_run(a, b):
    sa, sb = a["summary"], b["summary"]
    assert sa["steps"] == sb["steps"] == sa["total_steps"] == 12
    assert (sa["q"], sa["sigma_dp"], sa["eps_spent"]) == (sb["q"], sb["sigma_dp"], sb["eps_spent"])
    assert torch.equal(a["rng"], b["rng"])  # same batches and noise drawn, in the same order
    for part in ("model", "ema"):  # equal up to the order in which the clipped sums are added
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], rtol=1e-5, atol=1e-6), (part, k)


def test_two_gloo_processes_train_the_single_process_model(single, tmp_path):
    data, want = single
    log = torchrun(*ARGS, "--data-dir", data, "--out", tmp_path)
    assert_same_run(want, torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert "| 2 processes" in log and log.count("step    12/12") == 1  # rank 0 alone prints
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eps_spent"] == want["summary"]["eps_spent"] <= metrics["eps_target"]


def test_two_processes_resume_a_checkpoint_and_finish_the_same_run(single, tmp_path, monkeypatch):
    """A run interrupted after step 4 (one process) is finished by two: still the same run,
    and eps counts all 12 steps."""
    data, want = single
    real_save = m.save_checkpoint

    def crash_after_step_4(path, state):
        real_save(path, state)
        if state["summary"]["steps"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(m, "save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        m.main([*ARGS, "--data-dir", str(data), "--out", str(tmp_path)])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["summary"]["steps"] == 4
    log = torchrun(*ARGS, "--data-dir", data, "--out", tmp_path, "--resume")
    assert "resumed from" in log and "at step 4" in log
    assert_same_run(want, torch.load(tmp_path / "ckpt.pt", weights_only=False))
