"""Tests for 04_dpdm_mnist.py: end to end on tiny IDX data written here; the privacy
invariants as security properties (clip bound, noise scale, Poisson sampling, secret noise,
what is released, eps covers every step also after a resume, Ctrl-C or kill -9); the
accountant against published values; DPDM's samplers; bad input."""
import gzip
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (PUBLISHED_EPS, PUBLISHED_RDP, ROOT, exits_2, load_script, tiny_mnist,
                      write_idx)

m = load_script("04_dpdm_mnist")
N_TRAIN = 96
SMOKE_STEPS = 2 * math.ceil(N_TRAIN / 32)  # smoke preset: 2 epochs at q = 1/3


def run_main(*argv):
    m.main([str(a) for a in argv])


def smoke(data, out, *more):
    run_main("--preset", "smoke", "--data-dir", data, "--unverified", "--out", out, *more)


def refused(capsys, *argv):
    return exits_2(capsys, m.main, *argv)


def smoke_refused(capsys, data, out, *more):
    return refused(capsys, "--preset", "smoke", "--data-dir", data, "--unverified", "--out", out,
                   *more)


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke-preset run (default: secret noise), shared by tests that only read it."""
    base = tmp_path_factory.mktemp("smoke")
    data, out = tiny_mnist(base / "data"), base / "out"
    smoke(data, out)
    return data, out


def copy_run(src, dst, names=("model.pt", m.STATE_FILE, "metrics.json")):
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# --------------------------------------------------------------------------- end to end
def test_smoke_end_to_end_writes_every_output(smoke_run):
    _, out = smoke_run
    for name in m.RUN_FILES:
        assert (out / name).stat().st_size > 0, name
    s = np.load(out / "samples.npz")
    assert s["x"].dtype == np.uint8 and s["x"].shape == (20, 28, 28)
    assert np.bincount(s["y"], minlength=10).tolist() == [2] * 10
    mt = metrics(out)
    for key in ("eps_spent", "delta", "noise_multiplier", "q", "steps", "config", "privacy_guarantee"):
        assert key in mt["dp_release"], key
    assert mt["dp_release"]["privacy_guarantee"] == "valid"
    assert mt["not_covered_by_dp"]["n_train"] == N_TRAIN and "n_train" not in mt["dp_release"]


def test_sample_only_reads_the_releasable_model_and_never_overwrites(smoke_run, tmp_path, capsys):
    _, out = smoke_run
    run = copy_run(out, tmp_path / "run")
    before = (run / "metrics.json").read_text()
    run_main("--sample-only", "--ckpt", run / "model.pt", "--num-samples", 10)
    assert np.load(run / "resampled" / "samples.npz")["x"].shape == (10, 28, 28)
    assert (run / "metrics.json").read_text() == before
    assert metrics(run / "resampled")["dp_release"]["eps_spent"] == json.loads(before)["dp_release"]["eps_spent"]
    err = refused(capsys, "--sample-only", "--ckpt", run / "model.pt", "--num-samples", 10)
    assert re.search("already holds samples.npz.*--overwrite", err)  # a second time
    # --eval-only reads the test data before it samples: a missing folder fails at once
    err = refused(capsys, "--eval-only", "--ckpt", run / "model.pt", "--data-dir", tmp_path / "none",
                  "--out", tmp_path / "ev")
    assert "is not a folder" in err and not (tmp_path / "ev").exists()


def test_a_rerun_refuses_to_overwrite_a_run_and_changes_nothing(smoke_run, tmp_path, capsys):
    data, out = smoke_run
    run = copy_run(out, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    err = smoke_refused(capsys, data, run)
    assert re.search(r"already holds model.pt.*--resume.*--overwrite.*--out", err)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    smoke(data, run, "--overwrite")  # asked for: starts over
    assert (run / "model.pt").read_bytes() != before["model.pt"]


def test_resuming_a_finished_run_keeps_its_training_time(smoke_run, tmp_path):
    data, out = smoke_run
    run = copy_run(out, tmp_path / "run")
    first = metrics(out)
    smoke(data, run, "--resume")
    again = metrics(run)
    assert again["dp_release"]["eps_spent"] == first["dp_release"]["eps_spent"]
    assert again["not_covered_by_dp"]["train_s"] == pytest.approx(
        first["not_covered_by_dp"]["train_s"], abs=0.5)


def test_a_state_written_before_an_option_existed_resumes_with_its_default(smoke_run, tmp_path,
                                                                          capsys):
    data, out = smoke_run
    run = copy_run(out, tmp_path / "run")
    state = torch.load(run / m.STATE_FILE, weights_only=True)
    del state["config"]["noise_channels"]  # as written before --noise-channels existed
    torch.save(state, run / m.STATE_FILE)
    smoke(data, run, "--resume")
    assert metrics(run)["dp_release"]["eps_spent"] == metrics(out)["dp_release"]["eps_spent"]
    err = smoke_refused(capsys, data, run, "--resume", "--noise-channels", "16")
    assert re.search("another configuration.*noise_channels", err)


def test_every_run_ends_with_its_answer(smoke_run, tmp_path, capsys):
    data, _ = smoke_run
    smoke(data, tmp_path / "run", "--eval")
    text = capsys.readouterr().out.split("==== summary")[-1]
    for needle in ("(eps, delta) = (", f"after {SMOKE_STEPS}/{SMOKE_STEPS} steps", "noise multiplier",
                   "logreg", "mlp", "cnn", "safe to publish", "model.pt", "PRIVATE, never share",
                   m.STATE_FILE, "time "):
        assert needle in text, needle
    assert text.count("\n") < 12  # short


# --------------------------------------------------------------------------- secret noise, release boundary
def test_two_default_runs_on_the_same_data_differ(smoke_run, tmp_path):
    """With secret mechanism randomness the same command, even with the same public --seed,
    gives another model: nobody can replay the run from what is printed or stored."""
    data, out = smoke_run
    smoke(data, tmp_path / "a", "--seed", 0)  # the default's public seed, given explicitly
    a, b = (torch.load(d / "model.pt", weights_only=True)["ema"] for d in (out, tmp_path / "a"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_insecure_noise_seed_reproduces_and_says_the_guarantee_is_void(smoke_run, tmp_path):
    data, _ = smoke_run
    for d in "ab":
        smoke(data, tmp_path / d, "--insecure-noise-seed", 7)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert "VOID" in a["privacy"]["privacy_guarantee"]
    assert "VOID" in metrics(tmp_path / "a")["dp_release"]["privacy_guarantee"]


def test_the_secret_state_is_in_no_releasable_file(smoke_run, tmp_path, monkeypatch, capsys):
    secret = bytes(range(256)) * 9 + bytes(range(192))  # what secrets.token_bytes returns here
    monkeypatch.setattr(m.secrets, "token_bytes", lambda n: secret[:n])
    smoke(smoke_run[0], tmp_path, "--eval")
    log = capsys.readouterr()
    patterns = [secret[i:i + 16] for i in range(0, 2496, 16)] + [secret.hex()[:32].encode()]
    state = torch.load(tmp_path / m.STATE_FILE, weights_only=True)
    assert len(state["rng"]) == 5056  # the test can see the generator's state...
    assert (tmp_path / m.STATE_FILE).stat().st_mode & 0o777 == 0o600  # ...its owner alone
    released = [tmp_path / n for n in ("model.pt", "samples.npz", "grid.png", "metrics.json")]
    for blob in [p.read_bytes() for p in released] + [(log.out + log.err).encode()]:
        assert not any(pat in blob for pat in patterns)
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == {"format", "config", "ema", "privacy",
                                                                        "preset", "sampler"}


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create a file
        return (open, (str(self.path), "w"))


def test_a_crafted_pickle_is_refused_unread(smoke_run, tmp_path, capsys):
    witness = tmp_path / "pwned"
    crafted = tmp_path / "run" / m.STATE_FILE
    crafted.parent.mkdir()
    torch.save({"format": m.FORMAT, "payload": Exploit(witness)}, crafted)
    assert "refused unread" in smoke_refused(capsys, smoke_run[0], crafted.parent, "--resume")
    torch.save({"format": m.FORMAT, "payload": Exploit(witness)}, tmp_path / "model.pt")
    err = refused(capsys, "--sample-only", "--ckpt", tmp_path / "model.pt", "--out", tmp_path / "s")
    assert "refused unread" in err and not witness.exists()


def test_truncated_and_foreign_files_give_clear_errors(smoke_run, tmp_path, capsys):
    good = torch.load(smoke_run[1] / "model.pt", weights_only=True)
    blobs = [((smoke_run[1] / "model.pt").read_bytes()[:1000], "truncated"), (b"", "truncated")]
    for blob, message in blobs:
        (tmp_path / "model.pt").write_bytes(blob)
        assert message in refused(capsys, "--sample-only", "--ckpt", tmp_path / "model.pt")
    foreign = [({"config": {}, "step": 3}, "another version of this script"),  # an older format
               ({k: v for k, v in good.items() if k != "sampler"}, "another version"),
               ({**good, "config": {**good["config"], "dataset": "cifar"}}, "dataset must be one"),
               ({**good, "config": {**good["config"], "depth": 3}}, "does not match"),
               ({**good, "sampler": {**good["sampler"], "sampler": "euler"}}, "sampler must be"),
               ({**good, "config": {**good["config"], "channels": 16}}, "does not match"),
               ({**good, "preset": "huge"}, "unknown preset")]
    for obj, message in foreign:
        torch.save(obj, tmp_path / "model.pt")
        err = refused(capsys, "--sample-only", "--ckpt", tmp_path / "model.pt", "--out",
                      tmp_path / "s")
        assert message in err, (message, err)
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- accountant
def test_reported_eps_is_the_accountant_and_within_target(smoke_run):
    r = metrics(smoke_run[1])["dp_release"]
    assert r["steps"] == r["total_steps"] == SMOKE_STEPS
    assert r["eps_spent"] == pytest.approx(m.epsilon_rdp(r["q"], r["noise_multiplier"], r["steps"], r["delta"]), rel=1e-12)
    assert r["eps_spent"] <= r["eps_target"]
    # calibration is tight: 1 % less noise would overshoot the target
    assert m.epsilon_rdp(r["q"], 0.99 * r["noise_multiplier"], r["steps"], r["delta"]) > r["eps_target"]


def naive_rdp(q, sigma, a):
    """Closed form at integer orders: log sum_k C(a,k)(1-q)^(a-k) q^k e^((k^2-k)/(2 sigma^2)) / (a-1)."""
    logs = [math.log(math.comb(a, k)) + (a - k) * math.log(1 - q) + k * math.log(q)
            + (k * k - k) / (2 * sigma ** 2) for k in range(a + 1)]
    top = max(logs)
    return (top + math.log(sum(math.exp(v - top) for v in logs))) / (a - 1)


def test_rdp_matches_closed_form_and_published_values():
    orders = np.array([2.0, 3.0, 8.0, 32.0])
    for q, sigma in ((0.1, 2.0), (1 / 15, 2.487), (0.3, 0.7)):
        got = m.rdp_subsampled_gaussian(q, sigma, orders)
        assert got == pytest.approx([naive_rdp(q, sigma, int(a)) for a in orders], rel=1e-9)
    r = PUBLISHED_RDP
    rdp = r["steps"] * m.rdp_subsampled_gaussian(r["q"], r["noise_multiplier"], np.array([r["order"]]))
    assert rdp[0] == pytest.approx(r["value"], rel=r["rel"])
    e = PUBLISHED_EPS
    opacus_orders = np.concatenate([1 + np.arange(1, 100) / 10, np.arange(12, 64)])
    eps = m.epsilon_rdp(e["q"], e["noise_multiplier"], e["steps"], e["delta"], opacus_orders)
    assert eps == pytest.approx(e["value"], rel=e["rel"])


def test_04_calibrates_the_same_noise_multiplier_as_03(accountant):
    """One accountant's answer: on 03's orders and tolerance, 04's integral and 03's series give
    DPDM's MNIST noise multipliers (dpdm_facts: 2.487 at eps 10, 18.13 at eps 1) to 1e-6."""
    for eps in (10, 1):
        ours = m.get_noise_multiplier(eps, 1e-5, 1 / 15, 4500)
        assert ours == pytest.approx(accountant.get_noise_multiplier(eps, 1e-5, 1 / 15, 4500),
                                     rel=1e-6)
    assert np.array_equal(m.RDP_ORDERS, accountant.DEFAULT_ORDERS)
    assert 18.13 <= m.get_noise_multiplier(1, 1e-5, 1 / 15, 4500) <= 18.13 * 1.005


# --------------------------------------------------------------------------- DP-SGD step
def tiny_batch(cfg, b=13, seed=1):
    x, y = torch.rand(b, 1, 28, 28) * 2 - 1, torch.arange(b) % 10
    return m.batch_randomness(x, y, cfg, 10, torch.Generator().manual_seed(seed))


def smoke_model(**kw):
    torch.manual_seed(0)
    cfg = m.Config(**{**m.PRESETS["smoke"].config, **kw})
    model = m.build_denoiser(cfg)
    return cfg, model, m.functools.partial(m.dpdm_loss, sigma_data=model.sigma_data)


def test_clips_every_example_to_norm_at_most_c():
    """Grader of clip_per_example: every clipped per-example gradient has norm <= C, those
    below C are untouched, and the direction never changes."""
    cfg, model, loss_fn = smoke_model()
    grads, _ = m.per_example_grads(model, loss_fn, *tiny_batch(cfg))
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))  # by hand
    C = norms.median().item()  # some examples above C, some below
    clipped = m.clip_per_example(grads, C)
    after = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in clipped.values()))
    assert (norms > C).any() and (norms < C).any()
    assert (after <= C * (1 + 1e-6)).all()
    assert torch.allclose(after[norms < C], norms[norms < C], rtol=1e-6)
    assert torch.allclose(after[norms > C], torch.full_like(after[norms > C], C), rtol=1e-5)
    for k, g in grads.items():
        scale = (clipped[k].flatten(1) * g.flatten(1)).sum(1) / g.flatten(1).pow(2).sum(1).clamp(min=1e-30)
        assert torch.allclose(clipped[k], g * scale.view(-1, *[1] * (g.dim() - 1)), atol=1e-7)


def test_clip_sum_equals_naive_per_example_loop():
    """Grader of clip_per_example inside the real step: the clipped sum of private_gradient
    (noise off) equals one autograd pass per example, clipped by hand."""
    cfg, model, loss_fn = smoke_model(K=3, label_dropout=0.0)
    batch, C = tiny_batch(cfg, b=4, seed=3), 0.05
    grads, _ = m.private_gradient(model, loss_fn, *batch, C=C, noise_multiplier=0.0, expected_batch_size=1.0,
                                  generator=torch.Generator().manual_seed(0))
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        loss_fn(model, *[t[i:i + 1] for t in batch]).sum().backward()
        norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
        for k, p in model.named_parameters():
            want[k] += p.grad * min(1.0, C / norm)
    for k in want:
        assert torch.allclose(grads[k], want[k], atol=1e-6, rtol=1e-4), k


def test_private_gradient_adds_noise_of_scale_sigma_c_once_divided_by_qn():
    cfg, model, loss_fn = smoke_model()
    batch, C, nm, qn = tiny_batch(cfg), 0.3, 1.7, 11.0
    kw = dict(C=C, expected_batch_size=qn, chunk_size=5)
    clean, _ = m.private_gradient(model, loss_fn, *batch, noise_multiplier=0.0,
                                  generator=torch.Generator().manual_seed(0), **kw)
    noisy, _ = m.private_gradient(model, loss_fn, *batch, noise_multiplier=nm,
                                  generator=torch.Generator().manual_seed(9), **kw)
    replay = torch.Generator().manual_seed(9)  # the noise is one N(0, I) draw per parameter, in order
    for k, p in model.named_parameters():
        z = torch.randn(p.shape, generator=replay)
        assert torch.allclose((noisy[k] - clean[k]) * qn, nm * C * z, atol=1e-5), k
    noise = torch.cat([((noisy[k] - clean[k]) * qn).flatten() for k in noisy])
    # P ~ 48k draws: the sample std has relative standard error 1/sqrt(2P) ~ 0.0032; 5 s.e.
    assert noise.std().item() == pytest.approx(nm * C, rel=5 / math.sqrt(2 * len(noise)))


def test_chunk_size_changes_speed_not_result():
    cfg, model, loss_fn = smoke_model()
    batch = tiny_batch(cfg)
    runs = [m.private_gradient(model, loss_fn, *batch, C=1.0, noise_multiplier=1.0, expected_batch_size=13,
                               generator=torch.Generator().manual_seed(5), chunk_size=c)[0] for c in (3, 13)]
    for k in runs[0]:
        assert torch.allclose(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-7), k


def test_padding_the_chunks_changes_speed_not_result(monkeypatch):
    # the padded rows (copies of a real example) must never reach the clipped sum or the info,
    # and padding never makes a vmap call larger than the chunk (--chunk bounds memory)
    cfg, model, loss_fn = smoke_model()
    batch = tiny_batch(cfg)  # 13 rows in chunks of 10: a full chunk and a short one of 3
    runs, seen, real = [], [], m.per_example_grads
    monkeypatch.setattr(m, "per_example_grads", lambda *a, **k: seen.append(len(a[2])) or real(*a, **k))
    for pad in (1, 5, 16):
        monkeypatch.setattr(m, "PAD_TO", pad)
        runs.append(m.private_gradient(model, loss_fn, *batch, C=0.3, noise_multiplier=0.0, expected_batch_size=13,
                                       generator=torch.Generator().manual_seed(5), chunk_size=10))
    assert seen == [10, 3, 10, 5, 10, 10]  # 3 rows padded to 5; to 16 would exceed the chunk: 10
    for grads, info in runs[1:]:
        assert len(info["norms"]) == len(info["losses"]) == 13
        assert torch.allclose(info["norms"], runs[0][1]["norms"], rtol=1e-5)
        for k in grads:
            assert torch.allclose(grads[k], runs[0][0][k], rtol=1e-5, atol=1e-7), k


def test_poisson_sampling_includes_each_example_independently():
    """Batch sizes are Binomial(n, q): right mean AND variance (a shuffled fixed-size batch,
    which the accountant does not cover, has variance 0), every example equally likely.
    Tolerances are 5 standard errors: mean 5 sqrt(nq(1-q)/R); variance of R sizes and of n
    counts ~ var sqrt(2/(R-1)) resp. sqrt(2/(n-1)) (normal approximation)."""
    gen, n, q, R = torch.Generator().manual_seed(0), 5000, 0.04, 200
    batches = [m.poisson_sample(n, q, gen) for _ in range(R)]
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    var = n * q * (1 - q)
    assert abs(sizes.mean().item() - n * q) < 5 * math.sqrt(var / R)
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / (R - 1))
    assert all(len(set(b.tolist())) == len(b) for b in batches)
    counts = torch.bincount(torch.cat(batches), minlength=n).double()
    var_c = R * q * (1 - q)
    assert abs(counts.var().item() - var_c) < 5 * var_c * math.sqrt(2 / (n - 1))  # no favourites


def test_noise_multiplicity_averages_k_draws_per_example():
    cfg, model, loss_fn = smoke_model()
    torch.nn.init.normal_(model.net.conv_out.weight)  # a non-trivial output
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 5, 9])
    sigma, n = torch.rand(3, 4) + 0.1, torch.randn(3, 4, 1, 28, 28)
    got = loss_fn(model, x, y, sigma, n)
    want = torch.stack([loss_fn(model, x, y, sigma[:, k:k + 1], n[:, k:k + 1]) for k in range(4)]).mean(0)
    assert got.shape == (3,) and torch.allclose(got, want, rtol=1e-4)


def test_model_matches_dpdm_size_and_treats_examples_independently():
    paper = m.build_denoiser(m.Config())
    assert sum(p.numel() for p in paper.parameters()) == 1_753_345  # DPDM's MNIST DDPM++ (its README)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in paper.modules())
    _, net, _ = smoke_model()
    torch.nn.init.normal_(net.net.conv_out.weight)
    x, s = torch.randn(4, 1, 28, 28), torch.ones(4)
    y = torch.tensor([0, 1, 2, 10])  # 10 = the null label for guidance
    out = net(x, s, y)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 1, 28, 28)
    assert torch.allclose(net(x2, s, y)[0], out[0], atol=1e-6)  # no cross-example mixing


def test_noise_embedding_width_is_noise_channels_or_channels():
    # 0 (the default, and every model file written before the option existed) means --channels,
    # so old files build the same network; the cpu preset widens only the embedding to DPDM's 32
    smoke = m.PRESETS["smoke"].config
    narrow = m.build_denoiser(m.Config(**smoke)).net
    wide = m.build_denoiser(m.Config(**{**smoke, "noise_channels": 32})).net
    assert narrow.label.embedding_dim == narrow.map[0].in_features == smoke["channels"]
    assert wide.label.embedding_dim == wide.map[0].in_features == 32
    assert [p.shape for n, p in wide.named_parameters() if not n.startswith(("label", "map.0"))] == \
           [p.shape for n, p in narrow.named_parameters() if not n.startswith(("label", "map.0"))]
    assert wide(torch.randn(2, 1, 28, 28), torch.ones(2), torch.tensor([3, 10])).shape == (2, 1, 28, 28)


# --------------------------------------------------------------------------- samplers (DPDM's samplers.py)
MU, S = 0.1, 0.2


def exact_D(x, t):
    """The exact denoiser of data ~ N(MU, S^2): E[x0 | x] = MU + (x - MU) S^2 / (S^2 + t^2)."""
    return MU + (x - MU) * S ** 2 / (S ** 2 + t ** 2)


class ExactGaussianNet(torch.nn.Module):
    """F such that EDMDenoiser(F, param) is exact_D: checks the preconditioning of both
    parameterisations by inverting it."""
    n_classes, img_shape = 10, (1, 4, 4)

    def __init__(self, param):
        super().__init__()
        self.param, self.sd = param, (m.SIGMA_DATA if param == "edm" else 1.0)

    def forward(self, x_in, c_noise, y):
        t = ((4 * c_noise).exp() if self.param == "edm" else torch.tan(c_noise * math.pi / 2)).view(-1, 1, 1, 1)
        x = x_in * (t ** 2 + self.sd ** 2).sqrt()
        c_skip = self.sd ** 2 / (t ** 2 + self.sd ** 2)
        return (exact_D(x, t) - c_skip * x) / (t * self.sd / (t ** 2 + self.sd ** 2).sqrt())


@pytest.mark.parametrize("param", ["edm", "v"])
@pytest.mark.parametrize("sampler,steps", [("churn", 40), ("heun", 40), ("ddim", 200), ("ddim-stochastic", 400)])
def test_samplers_recover_a_gaussian_from_its_exact_denoiser(param, sampler, steps):
    """4,000 samples: the mean has s.e. 0.2/63 = 0.003 and the std relative s.e. 1.1 %; the
    tolerances (0.015 and 4 %) are 5 and ~3.5 s.e. plus the samplers' discretisation error."""
    sc = m.SamplerConfig(sampler=sampler, sample_steps=steps, s_churn=10.0, num_samples=4000)
    denoiser = m.EDMDenoiser(ExactGaussianNet(param), param)
    x, _ = m.generate(denoiser, sc, 4000, "cpu", seed=0, batch=4000)
    x = x.astype(np.float64) / 127.5 - 1  # uint8 rounding adds variance 1/(12 * 127.5^2): negligible
    assert x.mean() == pytest.approx(MU, abs=0.015)
    assert x.std() == pytest.approx(S, rel=0.04)


def recording(D):
    calls = []

    def wrapped(x, t):
        calls.append((float(t), D(x, t)))
        return calls[-1][1]
    return wrapped, calls


def test_churn_is_heun_at_s_churn_0_honours_dpdm_cap_and_returns_the_last_denoiser_output():
    sig = m.edm_sigma_steps(8)
    x = sig[0] * torch.randn(50, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    heun = m.sample_heun(exact_D, x, sig)
    churn0 = m.sample_churn(exact_D, x, sig, 0.0, 0.05, 50, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(heun, churn0)
    D, calls = recording(exact_D)  # S_churn/N = 100 > 1: gamma = DPDM's cap 1, so t_hat = 2t in [S_min, S_max]
    out = m.sample_churn(D, x, sig, 800.0, 0.05, 50, 1.0, torch.Generator().manual_seed(1))
    first = [t for t, _ in calls][::2]  # each step: D(x_hat, t_hat), then the correction (not on the last)
    for t, t_hat in zip(sig, first):
        assert t_hat == pytest.approx(2 * t if 0.05 <= t <= 50 else t)
    assert out is calls[-1][1] and len(calls) == 2 * len(sig) - 1


def test_ddim_ends_with_one_denoiser_call_at_sigma_min():
    sig = m.edm_sigma_steps(6)
    D, calls = recording(exact_D)
    out = m.sample_ddim(D, sig[0] * torch.randn(10, 1, 4, 4), sig)
    assert [t for t, _ in calls] == pytest.approx(sig)  # N - 1 Euler steps, then D at sigma_min
    assert out is calls[-1][1]


def test_guidance_mixes_conditional_and_null_predictions():
    class Fake(torch.nn.Module):
        n_classes = 10

        def forward(self, x, s, y):
            return x + y.view(-1, 1, 1, 1).float()
    y, x = torch.tensor([1, 3]), torch.zeros(2, 1, 2, 2)
    D = m.guided(Fake(), y, 0.5)
    assert torch.allclose(D(x, 1.0), 1.5 * (x + y.view(-1, 1, 1, 1)) - 0.5 * (x + 10))
    assert torch.equal(m.guided(Fake(), y, 0.0)(x, 1.0), x + y.view(-1, 1, 1, 1))


def test_paper_sampler_settings_per_dataset_and_eps():
    """DPImageBench's DPDM configs (configs/DPDM/*.yaml, sampler_fid / sampler_acc)."""
    fid, note = m.paper_sampler("mnist", 10, "fid")
    assert fid == dict(sampler="churn", sample_steps=1000, s_churn=50, s_min=0.05, s_max=50, guidance=0.25)
    assert note == ""
    assert m.paper_sampler("fmnist", 10, "fid")[0]["guidance"] == 1.0
    assert m.paper_sampler("mnist", 1, "acc")[0]["s_min"] == 0.1
    acc, note = m.paper_sampler("mnist", 0.2, "acc")  # no published eps = 0.2 line: nearest is 1
    assert acc["s_min"] == 0.1 and "eps = 1" in note
    with pytest.raises(m.UserError, match="mnist and fmnist only"):
        m.paper_sampler("celeba", 10, "fid")
    _, cfg, sc = m.parse_args(["--preset", "paper", "--eps", "1", "--sampler-setting", "acc"])
    assert (sc.sampler, sc.s_churn, sc.s_min, sc.num_samples) == ("churn", 10, 0.1, 60_000)
    _, cfg, sc = m.parse_args(["--preset", "paper"])  # DPDM's own default: DDIM, 50 steps
    assert (sc.sampler, sc.sample_steps, sc.guidance) == ("ddim", 50, 0.0)


# --------------------------------------------------------------------------- resume, Ctrl-C, kill -9
def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    data = tiny_mnist(tmp_path / "data")
    args = ["--epochs", 4, "--insecure-noise-seed", 3]  # reproducible noise, to compare two runs
    smoke(data, tmp_path / "a", *args)
    real_save, saves = m.save_run, []

    def crash_after_second_save(*a, **k):  # simulated crash right after a checkpoint
        real_save(*a, **k)
        saves.append(a[6]["steps"])
        if len(saves) == 2:
            raise RuntimeError("crash")

    monkeypatch.setattr(m, "save_run", crash_after_second_save)
    with pytest.raises(RuntimeError):
        smoke(data, tmp_path / "b", *args)
    monkeypatch.setattr(m, "save_run", real_save)
    smoke(data, tmp_path / "b", *args, "--resume")
    a, b = (metrics(tmp_path / d)["dp_release"] for d in "ab")
    assert saves == [2, 4] and b["steps"] == a["steps"] == 12
    assert b["eps_spent"] == a["eps_spent"] == m.epsilon_rdp(a["q"], a["noise_multiplier"], 12, a["delta"])
    ea, eb = (torch.load(tmp_path / d / "model.pt", weights_only=True)["ema"] for d in "ab")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)  # the very same run


def start(cmd):
    """A real run in a child process that reacts to Ctrl-C (a background process started from
    a non-interactive shell inherits SIGINT ignored: restore the default in the child)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_continue(tmp_path):
    """Ctrl-C mid-run: one line with the command that continues; the steps after the last
    checkpoint released nothing and are redone with the restored generator, so the resumed run
    is the very run that was never interrupted (same noise, same weights, eps counted once)."""
    data, out = tiny_mnist(tmp_path / "data"), tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "04_dpdm_mnist.py"), "--preset", "smoke", "--data-dir", str(data),
           "--unverified", "--out", str(out), "--epochs", "10", "--ckpt-every", "4", "--threads", "1",
           "--insecure-noise-seed", "3"]
    proc = start(cmd)
    for line in proc.stdout:  # wait for a step after the first checkpoint
        if line.startswith("step     6/"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    step = torch.load(out / m.STATE_FILE, weights_only=True)["steps"]
    assert step % 4 == 0 and 4 <= step < 30
    again = stderr.split("Continue with: ")[1].split()
    assert again[-1] == "--resume" and again[2:-1] == cmd[2:]  # the user's own flags
    subprocess.run([sys.executable, str(ROOT / again[1]), *again[2:]], check=True, capture_output=True, timeout=300)
    r = metrics(out)["dp_release"]
    assert r["steps"] == 30
    assert r["eps_spent"] == pytest.approx(m.epsilon_rdp(r["q"], r["noise_multiplier"], 30, r["delta"]), rel=1e-12)
    whole = tmp_path / "whole"
    subprocess.run([*cmd[:8], str(whole), *cmd[9:]], check=True, capture_output=True, timeout=300)
    ea, eb = (torch.load(d / "model.pt", weights_only=True)["ema"] for d in (out, whole))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_after_sigkill(tmp_path):
    data, out = tiny_mnist(tmp_path / "data"), tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "04_dpdm_mnist.py"), "--preset", "smoke", "--data-dir",
           str(data), "--unverified", "--out", str(out), "--epochs", "12", "--ckpt-every", "3", "--threads", "1"]
    total = 12 * math.ceil(N_TRAIN / 32)
    proc = start(cmd)
    try:
        for line in proc.stdout:
            if line.startswith("step    10/"):
                break
        os.kill(proc.pid, signal.SIGKILL)  # kill -9, possibly in the middle of a write
    finally:
        proc.wait()
    step = torch.load(out / m.STATE_FILE, weights_only=True)["steps"]
    assert 0 < step < total, "the run was not interrupted mid-way"
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True, timeout=300)
    r = metrics(out)["dp_release"]
    assert r["steps"] == total
    assert r["eps_spent"] == pytest.approx(m.epsilon_rdp(r["q"], r["noise_multiplier"], total, r["delta"]), rel=1e-12)


def test_a_state_of_another_configuration_is_refused(smoke_run, tmp_path, capsys):
    data, out = smoke_run
    run = copy_run(out, tmp_path / "run")
    assert re.search("another configuration.*lr", smoke_refused(capsys, data, run, "--resume",
                                                                "--lr", "0.5"))


# --------------------------------------------------------------------------- bad input
def test_a_non_finite_loss_stops_and_saves_nothing_new(smoke_run, tmp_path, monkeypatch, capsys):
    real = m.dpdm_loss
    monkeypatch.setattr(m, "dpdm_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    assert re.search("loss became nan at step 1.*--lr", smoke_refused(capsys, smoke_run[0], tmp_path))
    assert not (tmp_path / "model.pt").exists()


def test_dataset_names_are_case_insensitive():
    assert m.parse_args(["--dataset", "FMNIST"])[1].dataset == "fmnist"


def test_missing_and_corrupt_data_files_are_refused(tmp_path):
    data = tiny_mnist(tmp_path / "d")
    (data / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(m.UserError, match="lacks t10k-labels-idx1-ubyte.*four files"):
        m.load_data("mnist", data, unverified=True)
    with pytest.raises(m.UserError, match="checksum mismatch"):  # tiny data is not MNIST
        m.load_data("mnist", tiny_mnist(tmp_path / "e"))
    with pytest.raises(m.UserError, match="is not a folder.*four files"):
        m.load_data("mnist", data / "train-images-idx3-ubyte.gz")
    good = (data / "train-images-idx3-ubyte.gz").read_bytes()
    for bad, message in ((good[: len(good) // 2], "corrupt gzip"),
                         (gzip.compress(gzip.decompress(good)[:-5]), "corrupt IDX"),
                         (gzip.compress(b"\x00\x00\x09\x03" + bytes(20)), "bad magic")):
        (data / "train-images-idx3-ubyte.gz").write_bytes(bad)
        with pytest.raises(m.UserError, match=message):
            m.load_data("mnist", data, unverified=True)


def test_fashion_mnist_gz_is_verified_by_md5_and_raw_files_are_accepted(tmp_path, monkeypatch, capsys):
    data = tiny_mnist(tmp_path / "d")
    with pytest.raises(m.UserError, match=r"checksum mismatch \(md5-gz"):
        m.load_data("fmnist", data)
    for name in m.IDX_FILES:  # pretend the tiny .gz files are the published ones
        path = data / (name + ".gz")
        if path.exists():
            monkeypatch.setitem(m.CHECKSUMS["fmnist"], name, ("md5-gz", hashlib.md5(path.read_bytes()).hexdigest()))
    smoke(data, tmp_path / "out", "--dataset", "fmnist")
    assert metrics(tmp_path / "out")["dp_release"]["config"]["dataset"] == "fmnist"
    raw = tiny_mnist(tmp_path / "raw", gz=False)  # uncompressed files: checked by their structure
    assert len(m.load_data("fmnist", raw)["train"][0]) == N_TRAIN
    assert "checked by its structure only" in capsys.readouterr().out


def test_mnist_files_given_for_fashion_mnist_are_named_as_such(tmp_path, monkeypatch):
    data = tiny_mnist(tmp_path / "d")
    raw = gzip.decompress((data / "train-images-idx3-ubyte.gz").read_bytes())
    monkeypatch.setitem(m.CHECKSUMS["mnist"], "train-images-idx3-ubyte", ("sha256-raw", hashlib.sha256(raw).hexdigest()))
    with pytest.raises(m.UserError, match="is MNIST's file, not fmnist's: pass --dataset mnist"):
        m.load_data("fmnist", data)


def test_download_tries_mirrors_and_verifies_checksums(tmp_path, monkeypatch):
    name = "train-labels-idx1-ubyte"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    raw = write_idx(mirror / (name + ".gz"), np.arange(50) % 10)
    monkeypatch.setitem(m.CHECKSUMS["mnist"], name, ("sha256-raw", hashlib.sha256(raw).hexdigest()))
    dead, good = (tmp_path / "nowhere").as_uri() + "/", mirror.as_uri() + "/"
    m.download("mnist", name, tmp_path / "cache", mirrors=[dead, good])
    assert gzip.decompress((tmp_path / "cache" / (name + ".gz")).read_bytes()) == raw
    monkeypatch.setitem(m.CHECKSUMS["mnist"], name, ("sha256-raw", "0" * 64))
    with pytest.raises(m.UserError, match=f"could not download {name}.*nowhere.*checksum mismatch.*--data-dir"):
        m.download("mnist", name, tmp_path / "cache2", mirrors=[dead, good])
    assert not (tmp_path / "cache2" / (name + ".gz")).exists()
