"""Chapter 01 — Diffusion on a 1-D mixture of Gaussians, where every answer is known exactly.

What you learn
  How a diffusion model in EDM's form (Karras et al. 2022) works, on data whose ideal denoiser
  is known in closed form: the forward process, that exact denoiser (the reference every learned
  one is checked against), EDM's preconditioned network and loss, DPDM's noise multiplicity, and
  sampling by solving the probability-flow ODE with Heun's method or with churn.

Key equations and where they come from
  1. The forward process in EDM's sigma form: x_sigma = x_0 + sigma * n, n ~ N(0, 1), so the
     noisy marginals are p(x; sigma) = p_data * N(0, sigma^2)   (Karras et al. 2022, "EDM", Sec. 2).
  2. The exact denoiser D*(x; sigma) = E[x_0 | x_sigma = x]. For p_data = sum_k w_k N(mu_k, s_k^2):
        r_k(x)   = w_k N(x; mu_k, s_k^2 + sigma^2) / sum_j w_j N(x; mu_j, s_j^2 + sigma^2)
        D*(x; s) = sum_k r_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)]
     It is the reference every learned denoiser in this repository is checked against.
  3. A learned denoiser with EDM preconditioning (EDM Table 1, eq. 7):
        D_theta(x; sigma) = c_skip x + c_out F_theta(c_in x, c_noise),
        c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
        c_in = 1/sqrt(sigma^2+sd^2), c_noise = ln(sigma)/4       (sd = sigma_data)
     trained with  E_{sigma, n} lambda(sigma) |D_theta(x_0 + sigma n; sigma) - x_0|^2,
        lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2 = 1/c_out^2,  ln sigma ~ N(P_mean, P_std^2),
     with DPDM's values P_mean = -1.2, P_std = 1.2 and sigma_data = sqrt(1/3) (see SIGMA_DATA).
  4. Noise multiplicity (DPDM, Dockhorn et al. 2023, Sec. 3): each example's loss is the mean over
     K draws of (sigma, n). The K draws are iid, so the per-example gradient variance falls as 1/K
     while the privacy cost (which sees one gradient per example) is unchanged.
  5. Sampling = solving the probability-flow ODE  dx/dsigma = (x - D(x; sigma)) / sigma  from
     sigma_max down to 0 on EDM's schedule (eq. 5), i = 0..N-1, then sigma_N = 0:
        sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
     with Heun's method (EDM Alg. 1), or with "churn" (EDM Alg. 2), which corrects earlier errors:
     before each step it raises the noise level to sigma_hat = (1 + gamma) sigma_i by adding fresh
     noise of std sqrt(sigma_hat^2 - sigma_i^2); gamma = min(S_churn/N, sqrt(2) - 1) while
     S_min <= sigma_i <= S_max, else 0.

Run:  python 01_toy_diffusion.py   (CPU only; writes one figure to --out)
"""
import argparse
import math
import os
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=20_000, help="training examples from the mixture")
    p.add_argument("--steps", type=int, default=3000, help="training steps of the learned denoiser")
    p.add_argument("--batch", type=int, default=256, help="examples per training step")
    p.add_argument("--K", type=int, default=8, help="noise multiplicity: draws per example")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate, cosine-decayed")
    p.add_argument("--hidden", type=int, default=64, help="width of the denoiser MLP")
    p.add_argument("--num-steps", type=int, default=64, help="sampler steps N (churn needs ~64)")
    p.add_argument("--samples", type=int, default=10_000, help="samples per sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="out/01_toy_diffusion")
    args = p.parse_args(argv)
    counts = [args.n_train, args.steps, args.batch, args.K, args.hidden, args.samples]
    counts += [] if args.threads is None else [args.threads]
    if min(counts) < 1 or args.num_steps < 2:
        p.error("--n-train, --steps, --batch, --K, --hidden, --samples, --threads must be >= 1; "
                "--num-steps >= 2")
    return args


# ---- data: a 1-D mixture of Gaussians inside [-1, 1], like DPDM's pixels ----
WEIGHTS = torch.tensor([0.3, 0.5, 0.2])
MEANS = torch.tensor([-0.7, 0.15, 0.85])
STDS = torch.tensor([0.10, 0.12, 0.05])
# sigma_data = sqrt(1/3), the std of the uniform distribution on [-1, 1]: DPDM's public constant for
# data scaled to [-1, 1], fixed in advance and never estimated from the (private) data. EDM wants it
# near the data's std, so that c_in x and F's target have about unit variance (our mixture: 0.56).
SIGMA_DATA = math.sqrt(1 / 3)
P_MEAN, P_STD = -1.2, 1.2  # ln sigma ~ N(P_mean, P_std^2) during training (EDM, DPDM)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM / DPDM sampler defaults
S_CHURN, S_MIN, S_MAX, S_NOISE = 10.0, 0.05, 50.0, 1.0  # gamma = 10/64 ~ DPDM's 100/1000 steps


def sample_gmm(n, weights=WEIGHTS, means=MEANS, stds=STDS, generator=None):
    """n draws from p_data: component k with probability w_k, then x_0 = mu_k + s_k N(0, 1)."""
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    return means[k] + stds[k] * torch.randn(n, generator=generator, dtype=means.dtype)


def diffuse(x0, sigma, generator=None):
    """Forward process x_sigma = x_0 + sigma n, n ~ N(0, 1); its marginal is p(x; sigma)."""
    return x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)


def gmm_log_joint(x, sigma, weights=WEIGHTS, means=MEANS, stds=STDS):
    """log w_k N(x; mu_k, s_k^2 + sigma^2) per component k (last axis); noise adds sigma^2."""
    var = stds**2 + torch.as_tensor(sigma, dtype=x.dtype)[..., None] ** 2
    return weights.log() - 0.5 * (2 * math.pi * var).log() - 0.5 * (x[..., None] - means) ** 2 / var


def gmm_density(x, sigma, weights=WEIGHTS, means=MEANS, stds=STDS):
    """p(x; sigma) = sum_k w_k N(x; mu_k, s_k^2 + sigma^2)."""
    return gmm_log_joint(x, sigma, weights, means, stds).logsumexp(-1).exp()


def gmm_denoiser(x, sigma, weights=WEIGHTS, means=MEANS, stds=STDS):
    """Exact D*(x; sigma) = E[x_0 | x_sigma = x] = sum_k r_k(x) E[x_0 | x_sigma = x, k]."""
    r = gmm_log_joint(x, sigma, weights, means, stds).softmax(-1)  # responsibilities r_k(x)
    var = stds**2 + torch.as_tensor(sigma, dtype=x.dtype)[..., None] ** 2
    post_means = means + stds**2 / var * (x[..., None] - means)  # linear shrinkage per component
    return (r * post_means).sum(-1)


# ---- model: a small MLP with EDM preconditioning ----
def edm_precond(sigma, sigma_data=SIGMA_DATA):
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) at noise level sigma."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


class ToyMLP(nn.Module):
    """F_theta(c_in x, c_noise) for 1-D data, applied elementwise: `layers` hidden SiLU layers."""

    def __init__(self, hidden=64, layers=3):
        super().__init__()
        body = [nn.Linear(2, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            body += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.mlp = nn.Sequential(*body, nn.Linear(hidden, 1))

    def forward(self, x, c_noise):
        return self.mlp(torch.stack([x, c_noise], -1)).squeeze(-1)


class EDMDenoiser(nn.Module):
    """D_theta(x; sigma) = c_skip x + c_out F_theta(c_in x, c_noise); every entry of x is one 1-D
    example, sigma broadcasts against x."""

    def __init__(self, net, sigma_data=SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand_as(x)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


# ---- objective: lambda-weighted denoising loss with noise multiplicity K ----
def draw_sigma_and_noise(x, K, generator=None, p_mean=P_MEAN, p_std=P_STD):
    """K draws per example of x [B]: ln sigma ~ N(p_mean, p_std^2), n ~ N(0, 1); both [B, K]."""
    sigma = (p_mean + p_std * torch.randn(x.shape[0], K, generator=generator, dtype=x.dtype)).exp()
    return sigma, torch.randn(x.shape[0], K, *x.shape[1:], generator=generator, dtype=x.dtype)


def edm_loss(denoiser, x0, sigma, n, sigma_data=SIGMA_DATA):
    """Per-example loss, shape (batch,): mean over the K columns of lambda |D(x0 + sigma n) - x0|^2.
    lambda = 1/c_out^2 makes it |F_theta - F_target|^2, with a unit-variance target at any sigma."""
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (lam * (denoiser(x0[:, None] + sigma * n, sigma) - x0[:, None]) ** 2).mean(-1)


# ---- training ----
def train_denoiser(x_train, steps, batch, K, lr, seed, hidden, log_every=500):
    """Adam on the mean per-example loss; cosine-decayed learning rate. Deterministic given seed."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = EDMDenoiser(ToyMLP(hidden))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        x0 = x_train[torch.randint(len(x_train), (batch,), generator=gen)]
        loss = edm_loss(model, x0, *draw_sigma_and_noise(x0, K, gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if log_every and step % log_every == 0:
            rate = step / (time.time() - start)
            print(f"  step {step:5d}/{steps}  loss {running / log_every:.4f}  {rate:4.0f} steps/s  "
                  f"{(steps - step) / rate:4.1f} s left")
            running = 0.0
    return model.eval()


def gradient_variance_vs_K(model, x0, Ks=(1, 2, 4, 8, 16), reps=256, generator=None):
    """For each K: (variance, its standard error). variance = trace of the covariance, over reps
    noise draws, of one example's gradient of edm_loss, averaged over the examples x0.
    Per-example gradients via torch.func, as in DP-SGD."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, sigma, n):  # one example x with its K draws (sigma, n)
        D = lambda xs, s: functional_call(model, p, (xs, s))
        return edm_loss(D, x[None], sigma[None], n[None])[0]

    per_example_grad = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))
    variances = {}
    for K in Ks:
        x = x0.repeat_interleave(reps)  # each example reps times, each time with fresh draws
        g = per_example_grad(params, x, *draw_sigma_and_noise(x, K, generator))
        flat = torch.cat([v.reshape(len(x0), reps, -1) for v in g.values()], -1)
        # squared distances to the example's mean gradient; their mean is the (unbiased) variance
        sq = (flat - flat.mean(1, keepdim=True)).pow(2).sum(-1) * reps / (reps - 1)  # [ex., reps]
        se = (sq.var(1) / reps).sum().sqrt() / len(x0)  # standard error of the mean over both axes
        variances[K] = (sq.mean().item(), se.item())
    return variances


# ---- sampling ----
def edm_sigma_steps(num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """EDM eq. 5: num_steps levels from sigma_max to sigma_min, even in sigma^(1/rho); then 0."""
    if num_steps < 2 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need num_steps >= 2 and 0 < sigma_min < sigma_max; "
                         f"got {num_steps}, {sigma_min}, {sigma_max}")
    s = torch.linspace(sigma_max ** (1 / rho), sigma_min ** (1 / rho), num_steps) ** rho
    return torch.cat([s, torch.zeros(1)])


def heun_step(denoiser, x, t_cur, t_next):
    """One step of dx/dsigma = (x - D(x; sigma))/sigma: Euler, then the trapezoidal (Heun)
    correction unless t_next = 0, where the right-hand side is undefined (EDM Alg. 1)."""
    d = (x - denoiser(x, t_cur)) / t_cur
    x_next = x + (t_next - t_cur) * d
    if t_next > 0:
        x_next = x + (t_next - t_cur) * (d + (x_next - denoiser(x_next, t_next)) / t_next) / 2
    return x_next


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, return_path=False):
    """EDM Alg. 1 (deterministic) from x ~ N(0, sigmas[0]^2); return_path adds [(sigma, x), ...]."""
    path = [(sigmas[0].item(), x)]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        x = heun_step(denoiser, x, t_cur, t_next)
        path.append((t_next.item(), x))
    return (x, path) if return_path else x


@torch.no_grad()
def sample_churn(denoiser, x, sigmas, s_churn, s_min, s_max, s_noise, generator=None,
                 return_path=False):
    """EDM Alg. 2 (stochastic): add noise to go up from t_i to t_hat = (1 + gamma) t_i, then Heun
    down to t_{i+1}. The path records both moves (with gamma = 0 the first is a zero step)."""
    path, num_steps = [(sigmas[0].item(), x)], len(sigmas) - 1
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur * (1 + gamma)
        noise = s_noise * torch.randn(x.shape, generator=generator)
        x_hat = x + (t_hat**2 - t_cur**2).sqrt() * noise  # if x ~ p(x; t_i): x_hat ~ p(x; t_hat)
        x = heun_step(denoiser, x_hat, t_hat, t_next)
        path += [(t_hat.item(), x_hat), (t_next.item(), x)]
    return (x, path) if return_path else x


# ---- evaluation ----
def wasserstein1(a, b):
    """W1 between two 1-D samples = integral of |F_a(x) - F_b(x)| dx over their empirical CDFs."""
    a, b = a.flatten().double().sort().values, b.flatten().double().sort().values
    grid = torch.cat([a, b]).sort().values
    cdf = lambda s: torch.searchsorted(s, grid[:-1], right=True).double() / len(s)
    return ((cdf(a) - cdf(b)).abs() * grid.diff()).sum().item()


def component_fractions(x):
    """For each component k, the fraction of samples for which k is the most likely component."""
    return torch.bincount(gmm_log_joint(x, 0.0).argmax(-1), minlength=len(WEIGHTS)) / len(x)


@torch.no_grad()
def denoiser_rmse(denoiser, sigma, n=4000, generator=None):
    """RMS over x ~ p(x; sigma) of D(x; sigma) - D*(x; sigma). E lambda|D - x0|^2 is the minimum
    loss E lambda|D* - x0|^2 plus lambda E|D - D*|^2: training drives exactly this to zero."""
    x = diffuse(sample_gmm(n, generator=generator), sigma, generator)
    return (denoiser(x, sigma) - gmm_denoiser(x, sigma)).pow(2).mean().sqrt().item()


def plot_figure(paths_ode, paths_churn, samples, w1, path):
    """Left: p(x; sigma) as a heat map, with sampler trajectories. Right: sample histograms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image  # Pillow comes with matplotlib

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[1.7, 1]))
    sig = torch.logspace(math.log10(SIGMA_MIN), math.log10(SIGMA_MAX), 200)
    y = torch.linspace(-2, 2, 200)
    dens = gmm_density(y[:, None], sig[None, :])
    ax.pcolormesh(sig, y, dens / dens.max(0).values, shading="nearest", rasterized=True)
    for paths, color, label in [(paths_ode, "white", "Heun (ODE, EDM Alg. 1)"),
                                (paths_churn, "tab:orange", "churn (SDE, EDM Alg. 2)")]:
        sigma, x = zip(*paths[:-1])  # drop sigma = 0, which a log axis cannot show
        ax.plot(sigma, torch.stack(x), color=color, lw=0.8, alpha=0.9)
        ax.plot([], [], color=color, label=label)  # one legend entry per sampler
    ax.set(xscale="log", xlim=(SIGMA_MAX, SIGMA_MIN), ylim=(-2, 2), ylabel="x",
           xlabel="noise level $\\sigma$  (sampling runs left to right, from $\\sigma_{max}=80$)",
           title="$p(x;\\sigma) = p_{data} * N(0,\\sigma^2)$ (each column scaled to max 1)\n"
                 "and sampler trajectories with the exact denoiser $D^*$")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    grid = torch.linspace(-1.3, 1.3, 400)
    bx.plot(grid, gmm_density(grid, 0.0), "k", lw=2, label="true density $p_{data}$")
    for (name, x), color in zip(samples.items(), ["tab:blue", "tab:cyan", "tab:red", "tab:orange"]):
        bx.hist(x.numpy(), bins=70, range=(-1.3, 1.3), density=True, histtype="step", color=color,
                label=f"{name}: W1 {w1[name]:.3f}")
    bx.set(xlabel="x", ylabel="density",
           title=f"{len(x):,} samples per sampler, N={len(paths_ode) - 1} steps")
    bx.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)  # palette: 3x smaller


def main():
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    fmt = lambda t: "(" + ", ".join(f"{v:.3f}" for v in t.tolist()) + ")"
    print(f"[data] mixture: weights {fmt(WEIGHTS)}, means {fmt(MEANS)}, stds {fmt(STDS)}")
    x_train = sample_gmm(args.n_train, generator=gen)
    print(f"[data] {args.n_train:,} training examples; std {x_train.std():.3f}, "
          f"sigma_data = sqrt(1/3) = {SIGMA_DATA:.3f}")

    print(f"[train] EDM-preconditioned MLP: {args.steps} steps, batch {args.batch}, K = {args.K}")
    model = train_denoiser(x_train, args.steps, args.batch, args.K, args.lr, args.seed, args.hidden)

    print("[eval] RMS |D_theta - D*| over x ~ p(x; sigma), D* = exact mixture denoiser")
    for s in [0.002, 0.01, 0.05, 0.2, 1.0, 5.0, 80.0]:
        print(f"  sigma {s:7.3f}: {denoiser_rmse(model, s, generator=gen):.4f}")
    print("  (ln 80 is 4.6 P_std above P_mean: hardly trained, but there x >> D anyway)")

    print("[noise multiplicity] variance of one example's loss gradient over its K noise draws\n"
          "  (8 examples x 256 repetitions, +- 1 standard error). K iid draws averaged:\n"
          "  variance(K) = variance(1) / K, so the last column should read 1")
    var = gradient_variance_vs_K(model, x_train[:8], generator=gen)
    v1, se1 = var[1]
    for K, (v, se) in var.items():
        r = K * v / v1
        ratio = "1 (reference)" if K == 1 else f"{r:.3f} +- {r * math.hypot(se / v, se1 / v1):.3f}"
        print(f"  K = {K:2d}: variance {v:8.3f} +- {se:6.3f}   "
              f"K * variance / variance(K=1) = {ratio}")

    sigmas, reference = edm_sigma_steps(args.num_steps), sample_gmm(200_000, generator=gen)
    floor = wasserstein1(sample_gmm(args.samples, generator=gen), reference)
    print(f"[sample] {args.samples:,} samples per sampler, N = {args.num_steps} steps; W1 to 200k "
          f"true samples (a true sample of the same size: W1 = {floor:.4f})")
    x_T, samples = SIGMA_MAX * torch.randn(args.samples, generator=gen), {}
    churn = (S_CHURN, S_MIN, S_MAX, S_NOISE)
    for dname, den in [("exact D*", gmm_denoiser), ("learned", model)]:
        samples[f"{dname}, Heun"] = sample_heun(den, x_T, sigmas)
        samples[f"{dname}, churn"] = sample_churn(den, x_T, sigmas, *churn, gen)
    w1 = {name: wasserstein1(x, reference) for name, x in samples.items()}
    for name, x in samples.items():
        print(f"  {name:16s} W1 {w1[name]:.4f}   component weights {fmt(component_fractions(x))}")
    # Heun is a deterministic, monotone map from noise to data: compare the two denoisers' maps.
    gap = (samples["learned, Heun"] - samples["exact D*, Heun"]).abs().mean()
    print(f"  same noise, Heun: mean |x_learned - x_exact| = {gap:.4f}")

    _, ode = sample_heun(gmm_denoiser, x_T[:8], sigmas, return_path=True)
    _, sde = sample_churn(gmm_denoiser, x_T[:4], sigmas, *churn, gen, return_path=True)
    fig_path = os.path.join(args.out, "toy_diffusion.png")
    plot_figure(ode, sde, samples, w1, fig_path)
    print(f"[figure] {fig_path}; total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
