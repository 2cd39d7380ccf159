"""Chapter 02 tests: DP-SGD's privacy invariants, tested like security properties.

References are independent of the code under test: a plain loop of batch-size-1 backward
passes (per-example gradients), closed forms (noise std noise_multiplier * C, Binomial(N, q) batch
sizes, sensitivity C), and ordinary autograd (the non-private step). Statistical checks use
fixed seeds and tolerances of 5 standard errors, derived from the closed-form statistics.
Tolerances of 1e-6 to 1e-12 are float64 round-off bounds for exact identities, not statistics.

Graders (README "Assignments") depend only on their own exercise: the clipping tests get their
per-example gradients from the loop below, not from per_example_grads, and the per_example_grads
tests never clip.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyConvNet(nn.Module):
    """F(x, c_noise) with every layer kind DPDM's DDPM++ uses: convolution, GroupNorm, linear
    (noise embedding) and self-attention written out as in DDPM++'s AttnBlock."""

    def __init__(self, ch=8):
        super().__init__()
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.embed = nn.Linear(1, ch)
        self.norm = nn.GroupNorm(2, ch)
        self.qkv, self.proj = nn.Linear(ch, 3 * ch), nn.Linear(ch, ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, c_noise):
        h = F.silu(self.norm(self.conv_in(x) + self.embed(c_noise[:, None])[:, :, None, None]))
        B, C, H, W = h.shape
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # tokens = pixels
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C), dim=-1)
        h = h + self.proj(attn @ v).transpose(1, 2).reshape(B, C, H, W)
        return self.conv_out(h)


def make_problem(dpsgd, K, B=5, seed=0, outlier=False):
    """float64 EDM denoiser around TinyConvNet, and a batch (x, sigma, n) with K draws each."""
    torch.manual_seed(seed)
    model = dpsgd.EDMDenoiser(TinyConvNet()).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 6, 6, generator=gen, dtype=torch.float64)
    if outlier:
        x[0] *= 100.0  # an example whose unclipped gradient is huge: clipping must bind
    return model, (x, *dpsgd.draw_sigma_and_noise(x, K, gen))


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def loop_grads(model, *batch):
    """Per-example gradients of edm_loss the slow, obvious way: one backward pass per example."""
    names, params = zip(*model.named_parameters())
    rows = [torch.autograd.grad(model_loss(model, *[t[i:i + 1] for t in batch]), params)
            for i in range(batch[0].shape[0])]
    return {k: torch.stack([row[j] for row in rows]) for j, k in enumerate(names)}


def model_loss(model, x, sigma, n):
    """lambda(sigma) |D(x + sigma n; sigma) - x|^2 for ONE example (batch of 1), mean over its K
    draws, written out from EDM Table 1 so that the clipping graders need no code under test."""
    sd2 = 1 / 3  # sigma_data^2 (DPDM)
    xs = x.expand(sigma.shape[1], *x.shape[1:])
    s = sigma[0]
    y = xs + s.reshape(-1, *[1] * (x.dim() - 1)) * n[0]
    weight = (s**2 + sd2) / (s**2 * sd2)
    return (weight * (model(y, s) - xs).pow(2).flatten(1).mean(1)).mean()


# ----------------------------------------------------------------------------- per-example grads
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_example_grads_match_naive_loop(dpsgd, K, chunk_size):
    model, batch = make_problem(dpsgd, K)
    fast, fast_losses = dpsgd.per_example_grads(model, dpsgd.edm_loss, *batch,
                                                chunk_size=chunk_size)
    slow, slow_losses = dpsgd.naive_per_example_grads(model, dpsgd.edm_loss, *batch)
    assert len(fast) == len(list(model.parameters())) and fast["net.qkv.weight"].shape[0] == 5
    assert max_abs_diff(fast, slow) <= 1e-8
    assert fast_losses.shape == (5,)
    assert torch.allclose(fast_losses, slow_losses, rtol=1e-10, atol=0)
    norms = dpsgd.per_example_norms(slow)  # not vacuous: examples really differ
    assert norms.min() > 1e-3 and (norms.max() - norms.min()) > 1e-3


def test_loss_is_mean_over_K_draws(dpsgd):
    model, (x, sigma, n) = make_problem(dpsgd, K=4)
    per_draw = [dpsgd.edm_loss(model, x, sigma[:, k:k + 1], n[:, k:k + 1]) for k in range(4)]
    torch.testing.assert_close(dpsgd.edm_loss(model, x, sigma, n), torch.stack(per_draw).mean(0))


def test_private_gradient_is_the_same_in_chunks(dpsgd):
    # Not a grader (it needs clip_per_example and per_example_grads both).
    model, batch = make_problem(dpsgd, K=2, B=7)
    kw = dict(C=0.5, noise_multiplier=1.0, expected_batch_size=6.0)
    g1, info1 = dpsgd.private_gradient(model, dpsgd.edm_loss, *batch, **kw,
                                       generator=torch.Generator().manual_seed(1))
    g3, info3 = dpsgd.private_gradient(model, dpsgd.edm_loss, *batch, **kw, chunk_size=3,
                                       generator=torch.Generator().manual_seed(1))
    assert max_abs_diff(g1, g3) <= 1e-12
    for key in ("norms", "losses"):
        assert info1[key].shape == (7,)
        assert torch.allclose(info1[key], info3[key], rtol=0, atol=1e-12)
    torch.testing.assert_close(info1["losses"], dpsgd.edm_loss(model, *batch).detach())
    # without noise: the sum of the clipped loop gradients over qN
    g0, _ = dpsgd.private_gradient(model, dpsgd.edm_loss, *batch, C=0.5, noise_multiplier=0.0,
                                   expected_batch_size=6.0, generator=None, chunk_size=3)
    clipped = dpsgd.clip_per_example(loop_grads(model, *batch), 0.5)
    assert max_abs_diff(g0, {k: g.sum(0) / 6.0 for k, g in clipped.items()}) <= 1e-10


def test_edm_denoiser_is_skip_plus_scaled_network(dpsgd):
    # D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), EDM Table 1, c_* written out by hand for
    # sigma_data^2 = 1/3, one sigma per example; F returns c_in x + c_noise.
    class Sum(nn.Module):
        def forward(self, a, c_noise):
            return a + c_noise.reshape(-1, *[1] * (a.dim() - 1))
    x = torch.tensor([[[-0.5, 0.2]], [[0.9, 1.5]]], dtype=torch.float64)  # [B=2, 1, 2]
    sigma = torch.tensor([0.1, 5.0], dtype=torch.float64)
    s, sd2 = sigma[:, None, None], 1 / 3
    want = (sd2 / (s**2 + sd2) * x + s * math.sqrt(sd2) / (s**2 + sd2).sqrt()
            * (x / (s**2 + sd2).sqrt() + s.log() / 4))
    torch.testing.assert_close(dpsgd.EDMDenoiser(Sum())(x, sigma), want)
    # Pin of a published constant: DPDM's sigma_data = sqrt(1/3), the std of U[-1, 1].
    assert dpsgd.SIGMA_DATA == math.sqrt(1 / 3)


# ----------------------------------------------------------------------------- clipping
def test_clipping_bounds_every_norm_and_keeps_small_gradients(dpsgd):
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-3, 3, 40, dtype=torch.float64)  # norms from far below to far above C
    grads = {"w": torch.randn(40, 7, 3, generator=gen, dtype=torch.float64) * scale[:, None, None],
             "b": torch.randn(40, 5, generator=gen, dtype=torch.float64) * scale[:, None]}
    C = 1.0
    before = dpsgd.per_example_norms(grads)
    reference = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)  # flat norm
    torch.testing.assert_close(before, reference)
    clipped = dpsgd.clip_per_example(grads, C)
    after = dpsgd.per_example_norms(clipped)
    small, big = before < C, before > C
    assert small.sum() > 5 and big.sum() > 5
    assert (after <= C * (1 + 1e-6)).all()
    assert (after[big] >= C * (1 - 1e-6)).all()  # clipped to C, not below
    for k in grads:  # below C: untouched; above C: same direction
        assert torch.equal(clipped[k][small], grads[k][small])
        cos = F.cosine_similarity(clipped[k][big].flatten(1), grads[k][big].flatten(1), dim=1)
        assert (cos > 1 - 1e-12).all()
    unclipped = dpsgd.clip_per_example(grads, math.inf)
    assert all(torch.equal(unclipped[k], grads[k]) for k in grads)


# ----------------------------------------------------------------------------- noise
def test_noise_has_mean_zero_and_std_noise_multiplier_times_C(dpsgd):
    noise_multiplier, C = 1.3, 0.7
    zeros = {"w": torch.zeros(500, 400, dtype=torch.float64),
             "b": torch.zeros(20_000, dtype=torch.float64)}
    noisy = dpsgd.add_dp_noise(zeros, noise_multiplier, C, torch.Generator().manual_seed(0))
    z = torch.cat([v.flatten() for v in noisy.values()])
    n, std = z.numel(), noise_multiplier * C
    assert abs(z.mean().item()) <= 5 * std / math.sqrt(n)
    assert abs(z.std().item() - std) <= 5 * std / math.sqrt(2 * n)  # SE of a sample std
    for v in noisy.values():  # every tensor gets its own noise, not a shared draw
        assert abs(v.std().item() - std) <= 5 * std / math.sqrt(2 * v.numel())
    same = dpsgd.add_dp_noise(zeros, 0.0, C, torch.Generator().manual_seed(0))
    assert all(torch.equal(same[k], zeros[k]) for k in zeros)


def test_dp_step_with_infinite_C_and_zero_noise_is_ordinary_sgd(dpsgd):
    model, batch = make_problem(dpsgd, K=3, B=6)
    reference = copy.deepcopy(model)
    dpsgd.dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), dpsgd.edm_loss, *batch,
                      C=math.inf, noise_multiplier=0.0, expected_batch_size=6,
                      generator=torch.Generator().manual_seed(0))
    dpsgd.edm_loss(reference, *batch).mean().backward()  # plain autograd on the mean loss
    mean_grad = {k: p.grad.clone() for k, p in reference.named_parameters()}
    # the divisor is the EXPECTED batch size qN, not the realised one: 6 examples, qN = 12
    half, _ = dpsgd.private_gradient(reference, dpsgd.edm_loss, *batch, C=math.inf,
                                     noise_multiplier=0.0, expected_batch_size=12, generator=None)
    assert max_abs_diff(half, {k: g / 2 for k, g in mean_grad.items()}) <= 1e-10
    initial = [p.detach().clone() for p in reference.parameters()]
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for (name, p), p_ref, p0 in zip(model.named_parameters(), reference.parameters(), initial):
        assert (p - p_ref).abs().max() <= 1e-10, name
    assert max((p - p0).abs().max() for p, p0 in zip(model.parameters(), initial)) > 1e-4


# ----------------------------------------------------------------------------- Poisson sampling
def test_poisson_batch_sizes_are_binomial(dpsgd):
    n, q, T = 1000, 0.05, 4000
    gen = torch.Generator().manual_seed(0)
    batches = [dpsgd.poisson_sample(n, q, gen) for _ in range(T)]
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) <= 5 * math.sqrt(var / T)
    # SE of a sample variance ~ var * sqrt(2 / (T - 1)) (Binomial excess kurtosis ~0.02: negligible)
    assert abs(sizes.var().item() - var) <= 5 * var * math.sqrt(2 / (T - 1))
    hits = torch.zeros(n)
    for b in batches:
        assert len(torch.unique(b)) == len(b) and (b >= 0).all() and (b < n).all()
        hits[b] += 1
    # every example, not just the batch size, is included with probability q
    assert (hits / T - q).abs().max() <= 5 * math.sqrt(q * (1 - q) / T)


def test_empty_batch_takes_noise_only_step(dpsgd):
    model = nn.Linear(100, 100).double()
    before = [p.detach().clone() for p in model.parameters()]
    empty = (torch.zeros(0, 100, dtype=torch.float64),)
    loss_fn = lambda m, x: m(x).pow(2).sum(1)
    noise_multiplier, C, qN = 2.0, 0.5, 40.0
    info = dpsgd.dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn, *empty,
                             C=C, noise_multiplier=noise_multiplier, expected_batch_size=qN,
                             generator=torch.Generator().manual_seed(0))
    assert info["norms"].numel() == 0 and info["losses"].numel() == 0
    step = torch.cat([(p0 - p.detach()).flatten() for p, p0 in zip(model.parameters(), before)])
    std = noise_multiplier * C / qN  # the update is -N(0, noise_multiplier^2 C^2 I) / (qN)
    assert abs(step.mean().item()) <= 5 * std / math.sqrt(step.numel())
    assert abs(step.std().item() - std) <= 5 * std / math.sqrt(2 * step.numel())


# ----------------------------------------------------------------------------- sensitivity
@pytest.mark.parametrize("K", [1, 4, 16])
def test_one_example_moves_the_pre_noise_sum_by_at_most_C(dpsgd, K):
    """Add/remove adjacency (the one the Poisson accountant uses): sensitivity C, whatever K.
    Replacing one example is a removal plus an addition: at most 2C, and that bound is reached.
    The per-example gradients come from the loop above, so this grades clip_per_example alone."""
    C = 0.1
    model, (x, sigma, n) = make_problem(dpsgd, K, B=6, outlier=True)

    def pre_noise_sum(*batch):  # the plain sum of clipped gradients, and the unclipped norms
        grads = loop_grads(model, *batch)
        g = dpsgd.clip_per_example(grads, C)
        norms = torch.cat([v.flatten(1) for v in grads.values()], 1).norm(dim=1)
        return torch.cat([v.sum(0).flatten() for v in g.values()]), norms

    full, norms = pre_noise_sum(x, sigma, n)
    assert (norms > C).all() and norms[0] > 100 * C  # every example is clipped, the outlier by far
    removed, _ = pre_noise_sum(x[1:], sigma[1:], n[1:])
    assert (full - removed).norm() <= C * (1 + 1e-6)
    x_swap = x.clone()
    x_swap[0] = -x[0]  # the adversary's replacement: a gradient pointing the other way
    replaced, _ = pre_noise_sum(x_swap, sigma, n)
    assert C < (full - replaced).norm() <= 2 * C * (1 + 1e-6)


# ----------------------------------------------------------------------------- refusals
def test_batchnorm_is_refused(dpsgd):
    model = dpsgd.EDMDenoiser(nn.Sequential())
    model.net = TinyConvNet()
    model.net.norm = nn.BatchNorm2d(8)
    model = model.double()
    _, batch = make_problem(dpsgd, K=1)
    with pytest.raises(ValueError, match="GroupNorm"):
        dpsgd.per_example_grads(model, dpsgd.edm_loss, *batch)
    with pytest.raises(ValueError, match="batch"):
        dpsgd.dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), dpsgd.edm_loss,
                          *batch, C=1.0, noise_multiplier=1.0, expected_batch_size=5,
                          generator=torch.Generator())
    dpsgd.check_no_batchnorm(make_problem(dpsgd, K=1)[0])  # GroupNorm passes


def test_bad_input_is_refused_with_a_clear_error(dpsgd):
    g = {"w": torch.ones(3, 2)}
    with pytest.raises(ValueError, match="C must be > 0"):
        dpsgd.clip_per_example(g, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dpsgd.add_dp_noise({"w": torch.ones(2)}, -1.0, 1.0, None)
    with pytest.raises(ValueError, match="finite clipping norm"):
        dpsgd.add_dp_noise({"w": torch.ones(2)}, 1.0, math.inf, None)
    for q in (0.0, 1.5):
        with pytest.raises(ValueError, match="q must be in"):
            dpsgd.poisson_sample(10, q, None)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dpsgd.private_gradient(nn.Linear(2, 1), lambda m, x: m(x)[:, 0], torch.ones(1, 2), C=1.0,
                               noise_multiplier=1.0, expected_batch_size=0, generator=None)


# ----------------------------------------------------------------------------- secret noise
def mt19937_reference(random_bytes, n):
    """n raw 32-bit outputs of numpy's MT19937 (an independent implementation) whose 624 state
    words are random_bytes, at position 624: its next draw twists the state first."""
    bits = np.random.MT19937(0)
    key = np.frombuffer(random_bytes, dtype=np.uint32).copy()
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    return bits.random_raw(n)


def test_secret_generator_fills_the_whole_state_from_os_entropy(dpsgd, monkeypatch):
    random_bytes = np.random.default_rng(0).bytes(4 * 624)
    calls = []
    monkeypatch.setattr(dpsgd.secrets, "token_bytes", lambda n: calls.append(n) or random_bytes)
    gen = dpsgd.secret_generator()
    assert calls == [4 * 624]  # all 624 words of the Mersenne Twister from the OS's CSPRNG
    # randint below 2^16 takes one 32-bit output modulo 2^16: the same stream as numpy's
    drawn = torch.randint(0, 2**16, (2000,), generator=gen).numpy()
    np.testing.assert_array_equal(drawn, mt19937_reference(random_bytes, 2000) % 2**16)
    dpsgd.secret_generator(insecure_seed=7)
    assert calls == [4 * 624]  # an explicit insecure seed does not consume entropy


def test_two_secret_generators_never_share_a_state(dpsgd):
    g1, g2 = dpsgd.secret_generator(), dpsgd.secret_generator()
    assert not torch.equal(g1.get_state(), g2.get_state())
    assert torch.rand(1, generator=g1) != torch.rand(1, generator=g2)


def test_insecure_seeds_differing_above_bit_32_give_different_draws(dpsgd):
    # manual_seed keeps the low 32 bits of a seed: these three would be one and the same run
    draw = lambda seed: torch.randn(8, generator=dpsgd.secret_generator(insecure_seed=seed))
    seeds = [42, 42 + 2**32, 42 + 12345 * 2**40]
    for i, a in enumerate(seeds):
        assert torch.equal(draw(a), draw(a))  # the same seed replays exactly
        for b in seeds[i + 1:]:
            assert not torch.equal(draw(a), draw(b)), (a, b)


def test_filled_state_clears_the_cached_normal(dpsgd):
    """A scalar randn caches a second normal in the state: filling must not keep it (else the
    first normal after the fill would be a value drawn before it)."""
    random_bytes = bytes(range(256)) * 9 + bytes(range(192))  # any 4 * 624 bytes
    used = torch.Generator().manual_seed(3)
    torch.randn(1, generator=used)  # a scalar normal draw caches the second of its pair
    flag = used.get_state()[-16:-12]  # normal_is_valid, the last int32 of the legacy state
    assert torch.equal(flag, torch.tensor([1, 0, 0, 0], dtype=torch.uint8))
    used, fresh = (dpsgd.fill_generator_state(g, random_bytes) for g in (used, torch.Generator()))
    assert torch.equal(used.get_state(), fresh.get_state())
    assert torch.randn(1, generator=used) == torch.randn(1, generator=fresh)


def test_filled_state_gives_uniforms_and_standard_normals(dpsgd):
    n = 100_000
    gen = dpsgd.secret_generator(insecure_seed=11)  # fixed, so that the test is deterministic
    u, z = torch.rand(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen)
    assert 0 <= u.min() and u.max() < 1
    # 5 standard errors: U(0,1) has variance 1/12; a normal's sample std has std 1/sqrt(2n)
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(z.double().mean().item()) < 5 / math.sqrt(n)
    assert abs(z.double().std().item() - 1) < 5 / math.sqrt(2 * n)


def test_threads_default_to_torchs_choice(dpsgd):
    assert dpsgd.parse_args([]).threads is None  # main() leaves torch's thread count alone
    assert dpsgd.parse_args(["--threads", "2"]).threads == 2


def _train(dpsgd, argv):
    """A few DP-SGD steps of the demo's own train(); returns the final weights."""
    args = dpsgd.parse_args(["--steps", "3", "--n-data", "400", "--q", "0.1"] + argv)
    x = dpsgd.sample_toy_data(args.n_data, torch.Generator().manual_seed(args.seed))
    eval_batch = (x[:8], *dpsgd.draw_sigma_and_noise(x[:8], 2, torch.Generator().manual_seed(0)))
    model, curve = dpsgd.train(args, 2, args.clip, args.noise_multiplier, x, eval_batch, "test")
    return torch.cat([p.detach().flatten() for p in model.parameters()]), curve


def test_training_randomness_is_secret_unless_an_insecure_seed_is_given(dpsgd, capsys):
    # The replay attack: with a known seed, two runs on the same data would give the same model.
    for argv in ([], ["--seed", "3"]):
        (w1, curve1), (w2, curve2) = _train(dpsgd, argv), _train(dpsgd, argv)
        assert curve1[0] == curve2[0]  # --seed still fixes the public part: the initial weights
        assert not torch.equal(w1, w2), argv
    assert "privacy guarantee void" not in capsys.readouterr().out
    w1, _ = _train(dpsgd, ["--insecure-noise-seed", "5"])
    w2, _ = _train(dpsgd, ["--insecure-noise-seed", "5"])
    assert torch.equal(w1, w2)
    w3, _ = _train(dpsgd, ["--insecure-noise-seed", str(5 + 2**32)])  # same low 32 bits
    assert not torch.equal(w1, w3)
    assert "privacy guarantee void: noise seed known" in capsys.readouterr().out


def test_demo_runs_and_warns_loudly_with_an_insecure_seed(dpsgd, tmp_path, capsys):
    dpsgd.main(["--steps", "2", "--n-data", "300", "--ks", "1", "2", "--insecure-noise-seed", "1",
                "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # once at the start, then once per training run: non-private, K = 1, K = 2
    assert out.count("privacy guarantee void: noise seed known") == 4
    assert (tmp_path / "clipping_and_noise.png").exists()
    assert (tmp_path / "noise_multiplicity.png").exists()
