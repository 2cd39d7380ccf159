"""Multi-process DP-SGD (torchrun, gloo on CPU) must be the single-process run, split: the
same Poisson batches, the same clipped sums, the DP noise added once, the same eps. Two CPU
processes are started exactly as a user would: python -m torch.distributed.run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_script, tiny_mnist

m = load_script("04_dpdm_mnist")
ARGS = ["--preset", "smoke", "--unverified", "--epochs", "4", "--no-eval"]  # 12 steps
SEEDED = [*ARGS, "--insecure-noise-seed", "11"]  # reproducible noise: to compare runs


def torchrun(*argv, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / "04_dpdm_mnist.py"), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def state(out):
    return torch.load(out / m.STATE_FILE, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, same flags, same (insecure, known) noise seed."""
    base = tmp_path_factory.mktemp("dist")
    data = tiny_mnist(base / "data")
    m.main([*SEEDED, "--data-dir", str(data), "--out", str(base / "single")])
    return data, state(base / "single")


def assert_same_run(a, b):
    assert a["steps"] == b["steps"] == 12
    assert torch.equal(a["rng"], b["rng"])  # same batches and noise drawn, in the same order
    for part in ("model", "ema"):  # equal up to the order in which the clipped sums are added
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], rtol=1e-5, atol=1e-6), (part, k)


def test_two_gloo_processes_train_the_single_process_model(single, tmp_path):
    data, want = single
    log = torchrun(*SEEDED, "--data-dir", data, "--out", tmp_path)
    assert_same_run(want, state(tmp_path))
    assert "| 2 processes" in log and log.count("step    12/12") == 1  # rank 0 alone prints
    r = json.loads((tmp_path / "metrics.json").read_text())["dp_release"]
    assert r["steps"] == 12 and r["eps_spent"] <= r["eps_target"]


def test_two_processes_share_rank_0s_secret_noise_seed(single, tmp_path):
    """Without a known seed rank 0 draws the secret and broadcasts it: both processes draw the
    same noise (else the check at every checkpoint stops the run), and the run is a new one."""
    data, want = single
    torchrun(*ARGS, "--data-dir", data, "--out", tmp_path)
    got = state(tmp_path)
    assert got["steps"] == 12 and not torch.equal(got["rng"], want["rng"])


def test_two_processes_resume_a_checkpoint_and_finish_the_same_run(single, tmp_path, monkeypatch):
    """A run interrupted after step 4 (one process) is finished by two: still the same run,
    and eps counts all 12 steps."""
    data, want = single
    real_save = m.save_run

    def crash_after_step_4(*a, **k):
        real_save(*a, **k)
        if a[6]["steps"] == 4:
            raise RuntimeError("crash")

    monkeypatch.setattr(m, "save_run", crash_after_step_4)
    with pytest.raises(RuntimeError):
        m.main([*SEEDED, "--data-dir", str(data), "--out", str(tmp_path)])
    assert state(tmp_path)["steps"] == 4
    log = torchrun(*SEEDED, "--data-dir", data, "--out", tmp_path, "--resume")
    assert "resumed at step 4" in log
    assert_same_run(want, state(tmp_path))
