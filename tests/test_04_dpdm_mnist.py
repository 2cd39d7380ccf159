"""Tests for 04_dpdm_mnist.py: end to end on a tiny IDX dataset written here, the privacy
invariants (clip bound, noise scale, Poisson sampling, eps covers every step, also after a
resume and after kill -9), the accountant against published values, and bad input."""
import gzip
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script

m = load_script("04_dpdm_mnist")
N_TRAIN, N_TEST = 96, 20


def write_idx(path, arr, gz=True):
    arr = np.asarray(arr, np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return raw


def tiny_mnist(folder, seed=0):
    """Four IDX files of random 'digits' (blobs whose position encodes the class)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 4 + 2 * c:10 + 2 * c, 6:22] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, gz=False)  # raw works too
    return folder


def run_main(*argv):
    m.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke-preset run, shared by the tests that only read its outputs."""
    base = tmp_path_factory.mktemp("smoke")
    data, out = tiny_mnist(base / "data"), base / "out"
    run_main("--preset", "smoke", "--data-dir", data, "--unverified", "--out", out)
    return data, out


# --------------------------------------------------------------------------- end to end
def test_smoke_end_to_end_writes_every_output(smoke_run):
    _, out = smoke_run
    for name in ("grid.png", "samples.npz", "ckpt.pt", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    s = np.load(out / "samples.npz")
    cfg = m.Config(**m.PRESETS["smoke"])
    assert s["x"].dtype == np.uint8 and s["x"].shape == (cfg.num_samples, 28, 28)
    assert np.bincount(s["y"], minlength=10).tolist() == [cfg.num_samples // 10] * 10
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("config", "q", "sigma_dp", "steps", "delta", "eps_spent", "eps_target"):
        assert key in metrics, key
    assert metrics["config"]["batch"] == cfg.batch and metrics["n"] == N_TRAIN


def test_sample_only_regenerates_from_checkpoint(smoke_run, tmp_path):
    _, out = smoke_run
    run_main("--sample-only", "--ckpt", out / "ckpt.pt", "--num-samples", 30, "--out", tmp_path)
    assert np.load(tmp_path / "samples.npz")["x"].shape == (30, 28, 28)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eps_spent"] == json.loads((out / "metrics.json").read_text())["eps_spent"]



def test_sampling_from_a_checkpoint_never_overwrites_the_training_run(smoke_run, tmp_path):
    data, out = smoke_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("ckpt.pt", "metrics.json"):
        (run_dir / name).write_bytes((out / name).read_bytes())
    before = (run_dir / "metrics.json").read_text()
    run_main("--sample-only", "--ckpt", run_dir / "ckpt.pt", "--num-samples", 10)
    assert (run_dir / "resampled" / "samples.npz").exists()
    assert (run_dir / "metrics.json").read_text() == before
    # --eval-only reads the test data before it samples: a missing file fails at once
    with pytest.raises(SystemExit, match="missing"):
        run_main("--eval-only", "--ckpt", run_dir / "ckpt.pt", "--data-dir", tmp_path / "none",
                 "--out", tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_resuming_a_finished_run_keeps_its_training_time(smoke_run, tmp_path):
    data, out = smoke_run
    for name in ("ckpt.pt", "metrics.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    first = json.loads((out / "metrics.json").read_text())
    run_main("--preset", "smoke", "--data-dir", data, "--unverified", "--out", tmp_path, "--resume")
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["steps"] == first["steps"] and again["eps_spent"] == first["eps_spent"]
    assert again["train_time_s"] == pytest.approx(first["train_time_s"], abs=0.5)

# --------------------------------------------------------------------------- accountant
def test_reported_eps_is_the_accountant_and_within_target(smoke_run):
    metrics = json.loads((smoke_run[1] / "metrics.json").read_text())
    q, sigma, steps, delta = (metrics[k] for k in ("q", "sigma_dp", "steps", "delta"))
    assert steps == metrics["total_steps"] == round(2 * math.ceil(N_TRAIN / 32))
    assert metrics["eps_spent"] == pytest.approx(m.epsilon(q, sigma, steps, delta), rel=1e-12)
    assert metrics["eps_spent"] <= metrics["eps_target"]
    # calibration is tight: 1 % less noise would overshoot the target
    assert m.epsilon(q, 0.99 * sigma, steps, delta) > metrics["eps_target"]


def naive_rdp(q, sigma, a):
    """Closed form at integer orders: log sum_k C(a,k)(1-q)^(a-k) q^k e^((k^2-k)/(2 sigma^2)) / (a-1)."""
    logs = [math.log(math.comb(a, k)) + (a - k) * math.log(1 - q) + k * math.log(q)
            + (k * k - k) / (2 * sigma ** 2) for k in range(a + 1)]  # log of each term
    top = max(logs)
    return (top + math.log(sum(math.exp(v - top) for v in logs))) / (a - 1)


def test_rdp_matches_closed_form_and_published_values():
    orders = np.array([2.0, 3.0, 8.0, 32.0])
    for q, sigma in ((0.1, 2.0), (1 / 15, 2.487), (0.3, 0.7)):
        got = m.rdp_subsampled_gaussian(q, sigma, orders)
        assert got == pytest.approx([naive_rdp(q, sigma, int(a)) for a in orders], rel=1e-9)
    # TF-Privacy's rdp_accountant_test: compute_rdp(q=0.1, sigma=2, steps=10, order=5)
    assert 10 * m.rdp_subsampled_gaussian(0.1, 2.0, np.array([5.0]))[0] == pytest.approx(0.07737, abs=1e-5)
    # Opacus' RDP accountant test: sigma 1.5, q 0.04, 2250 steps, delta 1e-5, these orders
    orders = np.concatenate([np.arange(1.1, 10.95, 0.1), np.arange(12, 64)])
    assert m.epsilon(0.04, 1.5, 2250, 1e-5, orders) == pytest.approx(7.32911117143, rel=1e-6)
    # DPDM's MNIST setting (dpdm_facts.md: sigma = 2.487 at eps 10, 18.13 at eps 1)
    assert m.calibrate_sigma(10, 1 / 15, 4500, 1e-5) == pytest.approx(2.487, rel=5e-3)
    assert m.calibrate_sigma(1, 1 / 15, 4500, 1e-5) == pytest.approx(18.13, rel=5e-3)


# --------------------------------------------------------------------------- DP-SGD step
def test_dp_step_clips_every_example_and_adds_noise_of_scale_sigma_c():
    torch.manual_seed(0)
    cfg = m.Config(**{**m.PRESETS["smoke"], "chunk": 5})
    model = m.build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(13, 1, 28, 28) * 2 - 1, torch.arange(13) % 10
    _, probe = m.clipped_grad_sum(model, x, y, cfg, torch.Generator().manual_seed(1), 10)
    cfg.clip = probe["norms"].median().item()  # so that some examples are clipped, some not
    sigma_dp, expected = 1.7, 11.0
    stats = m.dp_step(model, opt, x, y, cfg, sigma_dp, expected, torch.Generator().manual_seed(1),
                      record=True)
    norms, clipped = stats["norms"], stats["clipped_norms"]
    assert len(clipped) == 13 and (norms > cfg.clip).any() and (norms < cfg.clip).any()
    assert (clipped <= cfg.clip * (1 + 1e-5)).all()                       # clip bound
    small = norms < cfg.clip
    assert torch.allclose(clipped[small], norms[small], rtol=1e-5)        # small grads untouched
    noise = torch.cat([z.flatten() for z in stats["noise"].values()])
    assert noise.std().item() == pytest.approx(sigma_dp * cfg.clip, rel=0.02)  # P ~ 48k draws
    assert abs(noise.mean().item()) < 0.02 * sigma_dp * cfg.clip
    for k, p in model.named_parameters():  # released gradient = (clipped sum + noise) / (qN)
        assert torch.allclose(p.grad * expected, stats["clipped_sum"][k] + stats["noise"][k],
                              atol=1e-5)


def test_clip_sum_equals_naive_per_example_loop():
    """vmap'd per-example gradients equal one autograd pass per example."""
    torch.manual_seed(0)
    cfg = m.Config(**{**m.PRESETS["smoke"], "K": 3, "clip": 0.05, "label_dropout": 0.0})
    model = m.build_model(cfg)
    x, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([1, 2, 3, 4])
    total, _ = m.clipped_grad_sum(model, x, y, cfg, torch.Generator().manual_seed(3), 10)
    gen = torch.Generator().manual_seed(3)  # replay the same draws: dropout, sigma, noise
    torch.rand(4, generator=gen)
    sigma, noise = m.sample_sigma((4, 3), cfg, gen), torch.randn((4, 3, 1, 28, 28), generator=gen)
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        m.diffusion_loss(model, x[i:i + 1], y[i:i + 1], sigma[i:i + 1], noise[i:i + 1], cfg.param).sum().backward()
        norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
        for k, p in model.named_parameters():
            want[k] += p.grad * min(1.0, cfg.clip / norm)
    for k in want:
        assert torch.allclose(total[k], want[k], atol=1e-6, rtol=1e-4), k


def test_chunk_size_changes_speed_not_result():
    """The logical batch's randomness is drawn before it is cut into physical chunks."""
    torch.manual_seed(0)
    model = m.build_model(m.Config(**m.PRESETS["smoke"]))
    x, y = torch.rand(13, 1, 28, 28) * 2 - 1, torch.arange(13) % 10
    runs = []
    for chunk in (3, 13):
        gen = torch.Generator().manual_seed(5)
        total, _ = m.clipped_grad_sum(model, x, y, m.Config(**{**m.PRESETS["smoke"], "chunk": chunk}), gen, 10)
        runs.append((total, gen.get_state()))
    (a, state_a), (b, state_b) = runs
    assert torch.equal(state_a, state_b)  # the same draws: the next batch and noise agree too
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


def test_poisson_sampling_includes_each_example_independently():
    """Batch sizes are Binomial(n, q): right mean AND variance (a shuffled fixed-size batch,
    which the accountant does not cover, has none), every example equally likely."""
    gen, n, q = torch.Generator().manual_seed(0), 5000, 0.04
    batches = [m.poisson_batch(n, q, gen) for _ in range(200)]
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert sizes.mean().item() == pytest.approx(n * q, rel=0.02)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.3)
    counts = torch.bincount(torch.cat(batches), minlength=n).double()
    assert all(len(set(b.tolist())) == len(b) for b in batches)
    assert counts.var().item() == pytest.approx(200 * q * (1 - q), rel=0.15)  # no favourites


def test_noise_multiplicity_averages_k_draws_per_example():
    cfg = m.Config(**m.PRESETS["smoke"])
    model = m.build_model(cfg)
    torch.nn.init.normal_(model.conv_out.weight)  # non-trivial output
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 5, 9])
    sigma, noise = torch.rand(3, 4) + 0.1, torch.randn(3, 4, 1, 28, 28)
    got = m.diffusion_loss(model, x, y, sigma, noise, "edm")
    want = torch.stack([m.diffusion_loss(model, x, y, sigma[:, k:k + 1], noise[:, k:k + 1], "edm")
                        for k in range(4)]).mean(0)
    assert got.shape == (3,) and torch.allclose(got, want, rtol=1e-4)


def test_model_matches_dpdm_size_and_treats_examples_independently():
    paper = m.build_model(m.Config(**m.PRESETS["paper"]))
    assert sum(p.numel() for p in paper.parameters()) == 1_753_345  # DPDM's MNIST DDPM++
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in paper.modules())
    net = m.build_model(m.Config(**m.PRESETS["smoke"]))
    torch.nn.init.normal_(net.conv_out.weight)
    x, c = torch.randn(4, 1, 28, 28), torch.zeros(4)
    y = torch.tensor([0, 1, 2, 10])  # 10 = the null label for guidance
    out = net(x, c, y)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 1, 28, 28)
    assert torch.allclose(net(x2, c, y)[0], out[0], atol=1e-6)  # no cross-example mixing


class ExactGaussianNet(torch.nn.Module):
    """F such that D(x; sigma) is the exact denoiser of data ~ N(mu, s^2): D = mu + (x - mu)
    s^2 / (s^2 + sigma^2), written through the preconditioning it is wrapped in."""
    n_classes, mu, s = 10, 0.1, 0.2

    def __init__(self, param):
        super().__init__()
        self.param, self.sd = param, (m.SIGMA_DATA if param == "edm" else 1.0)

    def forward(self, x_in, c_noise, y):
        sigma = ((4 * c_noise).exp() if self.param == "edm" else torch.tan(c_noise * math.pi / 2)).view(-1, 1, 1, 1)
        x = x_in * (sigma ** 2 + self.sd ** 2).sqrt()
        d = self.mu + (x - self.mu) * self.s ** 2 / (self.s ** 2 + sigma ** 2)
        c_skip = self.sd ** 2 / (sigma ** 2 + self.sd ** 2)
        return (d - c_skip * x) / (sigma * self.sd / (sigma ** 2 + self.sd ** 2).sqrt())


@pytest.mark.parametrize("param", ["edm", "v"])
@pytest.mark.parametrize("sampler,steps,tol", [("churn", 40, 0.04), ("heun", 40, 0.03), ("ddim", 200, 0.04)])
def test_samplers_recover_a_gaussian_from_its_exact_denoiser(param, sampler, steps, tol):
    cfg = m.Config(sampler=sampler, sample_steps=steps, s_churn=10.0, guidance=0.0)
    x = m.edm_sampler(ExactGaussianNet(param), torch.zeros(4000, dtype=torch.long), cfg,
                      torch.Generator().manual_seed(0), (4000, 1, 4, 4), param)
    assert x.mean().item() == pytest.approx(0.1, abs=0.01)
    assert x.std().item() == pytest.approx(0.2, rel=tol)


# --------------------------------------------------------------------------- resume
def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    data = tiny_mnist(tmp_path / "data")
    args = ["--preset", "smoke", "--data-dir", data, "--unverified", "--epochs", 4]
    run_main(*args, "--out", tmp_path / "a")

    real_save, saves = m.save_checkpoint, []

    def crash_after_second_save(path, state):  # simulated crash right after a checkpoint
        real_save(path, state)
        saves.append(state["summary"]["steps"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(m, "save_checkpoint", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        run_main(*args, "--out", tmp_path / "b")
    monkeypatch.setattr(m, "save_checkpoint", real_save)
    run_main(*args, "--out", tmp_path / "b", "--resume")

    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert saves == [2, 4] and b["steps"] == a["steps"] == a["total_steps"] == 12
    assert b["eps_spent"] == a["eps_spent"] == m.epsilon(a["q"], a["sigma_dp"], 12, a["delta"])
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    for k in ca["model"]:  # same RNG stream after resume: the very same training run
        assert torch.equal(ca["model"][k], cb["model"][k]), k


def test_resume_after_sigkill(tmp_path):
    data = tiny_mnist(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "04_dpdm_mnist.py"), "--preset", "smoke", "--data-dir",
           str(data), "--unverified", "--out", str(out), "--epochs", "25", "--ckpt-every", "3"]
    total = 25 * math.ceil(N_TRAIN / 32)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)  # kill -9, possibly in the middle of a write
    finally:
        proc.wait()
    step = torch.load(out / "ckpt.pt", weights_only=False)["summary"]["steps"]
    assert 0 < step < total, "the run was not interrupted mid-way"
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True, timeout=300)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == total
    assert metrics["eps_spent"] == pytest.approx(
        m.epsilon(metrics["q"], metrics["sigma_dp"], total, metrics["delta"]), rel=1e-12)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flag,value,message", [("--eps", 0, "eps must be > 0"),
                                                ("--eps", -1, "eps must be > 0"),
                                                ("--delta", 0.02, "delta must be in")])
def test_bad_privacy_parameters_are_refused(smoke_run, tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        run_main("--preset", "smoke", "--data-dir", smoke_run[0], "--unverified",
                 "--out", tmp_path, flag, value)


def test_missing_and_corrupt_data_files_are_refused(tmp_path):
    data = tiny_mnist(tmp_path / "d")
    (data / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(m.UserError, match="missing t10k-labels-idx1-ubyte.*are at https.*--data-dir"):
        m.load_data("mnist", data, unverified=True)
    with pytest.raises(m.UserError, match="checksum mismatch"):  # tiny data is not MNIST
        m.load_data("mnist", tiny_mnist(tmp_path / "e"))
    good = (data / "train-images-idx3-ubyte.gz").read_bytes()
    for bad, message in ((good[: len(good) // 2], "corrupt gzip"),
                         (gzip.compress(gzip.decompress(good)[:-5]), "corrupt IDX"),
                         (gzip.compress(b"\x00\x00\x09\x03" + bytes(20)), "bad magic")):
        (data / "train-images-idx3-ubyte.gz").write_bytes(bad)
        with pytest.raises(m.UserError, match=message):
            m.load_data("mnist", data, unverified=True)


def test_fashion_mnist_trains_like_mnist_and_is_verified_by_md5_of_its_gz(tmp_path, monkeypatch):
    data = tiny_mnist(tmp_path / "d")
    with pytest.raises(m.UserError, match=r"checksum mismatch \(md5-gz"):
        m.load_data("fmnist", data)
    for name in m.IDX_FILES:  # pretend the tiny files are the published ones
        path = next(p for p in (data / (name + ".gz"), data / name) if p.exists())
        monkeypatch.setitem(m.CHECKSUMS["fmnist"], name, ("md5-gz", hashlib.md5(path.read_bytes()).hexdigest()))
    run_main("--preset", "smoke", "--dataset", "fmnist", "--data-dir", data, "--out", tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "fmnist" and metrics["n"] == N_TRAIN


def test_download_tries_mirrors_and_verifies_checksums(tmp_path, monkeypatch):
    name = "train-labels-idx1-ubyte"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    raw = write_idx(mirror / (name + ".gz"), np.arange(50) % 10)
    monkeypatch.setitem(m.CHECKSUMS["mnist"], name, ("sha256-raw", hashlib.sha256(raw).hexdigest()))
    dead, good = (tmp_path / "nowhere").as_uri() + "/", mirror.as_uri() + "/"
    cache = tmp_path / "cache"
    m.download("mnist", name, cache, mirrors=[dead, good])
    assert gzip.decompress((cache / (name + ".gz")).read_bytes()) == raw
    monkeypatch.setitem(m.CHECKSUMS["mnist"], name, ("sha256-raw", "0" * 64))
    with pytest.raises(m.UserError, match=f"(?s)could not download {name}.*nowhere.*checksum mismatch"):
        m.download("mnist", name, tmp_path / "cache2", mirrors=[dead, good])
    assert not (tmp_path / "cache2" / (name + ".gz")).exists()


def test_checkpoint_of_another_configuration_is_refused(smoke_run, tmp_path):
    data, out = smoke_run
    (tmp_path / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes())
    with pytest.raises(SystemExit, match="another configuration.*lr"):
        run_main("--preset", "smoke", "--data-dir", data, "--unverified", "--out", tmp_path,
                 "--resume", "--lr", "0.5")


def test_checkpoint_of_an_older_format_is_refused_clearly(smoke_run, tmp_path):
    torch.save({"config": {}, "step": 3}, tmp_path / "ckpt.pt")
    for flags in (["--sample-only", "--ckpt", tmp_path / "ckpt.pt"],
                  ["--preset", "smoke", "--data-dir", smoke_run[0], "--unverified", "--resume"]):
        with pytest.raises(SystemExit, match="older version of this script"):
            run_main(*flags, "--out", tmp_path)
