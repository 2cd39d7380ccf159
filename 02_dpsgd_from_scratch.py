"""Chapter 02 — DP-SGD by hand: per-example gradients, clipping, noise, Poisson sampling.

What you learn
  DP-SGD (Abadi et al. 2016) written out with nothing borrowed from a DP library: per-example
  gradients with torch.func, flat clipping, one Gaussian draw, Poisson sampling, and where the
  mechanism's randomness must come from. Then the one change DPDM makes for diffusion models,
  noise multiplicity (DPDM Sec. 3), and what clipping, noise and K do to a small denoiser.

One DP-SGD step on a data set of N examples (DPDM Sec. 2; Abadi et al. 2016, Alg. 1):
  1. Poisson sampling: every example joins the batch B independently with probability q.
  2. per-example gradients   g_i = grad_theta l(theta; x_i)                 (torch.func: vmap(grad))
  3. flat clipping           g_i <- g_i * min(1, C / ||g_i||_2)           (norm over ALL parameters)
  4. one Gaussian draw       g   = ( sum_i g_i + N(0, noise_multiplier^2 C^2 I) ) / (qN)
  5. any optimizer step with g (post-processing costs no privacy).
Adding or removing one example moves sum_i g_i by at most C (its sensitivity; replacing one
is a removal plus an addition, 2C), so step 4 is the Poisson-subsampled Gaussian mechanism
that the accountant of chapter 03 turns into (epsilon, delta).

Noise multiplicity (DPDM Sec. 3): the diffusion loss of ONE example averages K draws,
  l(theta; x_i) = 1/K sum_k lambda(sigma_k) || D_theta(x_i + sigma_k n_k; sigma_k) - x_i ||^2 ,
and is clipped once: the sensitivity is still C, so the privacy cost does not depend on K,
while the per-example gradient variance falls like 1/K. (sigma is the diffusion level only.)

The demo trains chapter 01's toy denoiser (EDM preconditioning, Karras et al. 2022, Table 1;
re-expressed here, since no chapter imports another) privately, with three changes: F is
smaller (2 hidden layers of 32, 1,185 parameters, not 3 of 64), since the DP noise norm grows
like sqrt(#parameters); data have shape [N, 1], so that the same functions run on images
[N, C, H, W]; and the data are an easier mixture, 0.4 N(-0.6, 0.1^2) + 0.6 N(0.5, 0.15^2), on
which a few hundred DP steps visibly lower the loss and the runs for different K differ (on
01's three narrow components they cannot be told apart).

The mechanism's randomness must be secret (secret_generator() says why): Poisson sampling,
diffusion draws and DP noise come from OS entropy, never printed or saved. --seed fixes only
what is public (initial weights, toy data, figures); --insecure-noise-seed N (debugging, tests)
makes training reproducible and voids the guarantee. torch's Mersenne Twister is no CSPRNG, and
floating-point Gaussians leak through their low-order bits (Mironov 2012): for a deployment,
Opacus' secure_mode (torchcsprng, each Gaussian a sum of several draws) is the reference.
"""
import argparse
import hashlib
import math
import pathlib
import secrets
import struct
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from torch.func import functional_call, grad_and_value, vmap


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-data", type=int, default=10_000, help="N, size of the private data set")
    p.add_argument("--q", type=float, default=0.05, help="Poisson sampling rate (batch qN)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--clip", type=float, default=1.0, help="C, per-example clipping norm")
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="DP noise std / C")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="noise multiplicities")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=32, help="width of the toy MLP")
    p.add_argument("--seed", type=int, default=0,
                   help="PUBLIC randomness only: initial weights, toy data, figures")
    p.add_argument("--insecure-noise-seed", type=int, default=None, metavar="N",
                   help="reproducible training randomness (Poisson sampling, noise) for debugging; "
                        "voids the privacy guarantee: the noise seed is known")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/02_dpsgd_from_scratch"))
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
# sigma_data = sqrt(1/3), the std of the uniform distribution on [-1, 1]: DPDM's public constant for
# data scaled to [-1, 1], fixed in advance and never estimated from the private data (that would
# leak, and cost privacy budget).
SIGMA_DATA = math.sqrt(1 / 3)


def sample_toy_data(n, generator):
    """1-D Gaussian mixture in [-1, 1]: 0.4 N(-0.6, 0.1^2) + 0.6 N(0.5, 0.15^2), shape [n, 1].
    Not chapter 01's three components: see the module docstring for why."""
    left = torch.rand(n, generator=generator) < 0.4
    z = torch.randn(n, generator=generator)
    return torch.where(left, -0.6 + 0.1 * z, 0.5 + 0.15 * z)[:, None]


# ----------------------------------------------------------------------------- model
def edm_precond(sigma, sigma_data=SIGMA_DATA):
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) at noise level sigma."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


class ToyMLP(nn.Module):
    """F_theta(c_in x, c_noise) for x [B, 1]: chapter 01's MLP, `layers` hidden SiLU layers."""

    def __init__(self, hidden=32, layers=2):
        super().__init__()
        body = [nn.Linear(2, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            body += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.mlp = nn.Sequential(*body, nn.Linear(hidden, 1))

    def forward(self, x, c_noise):
        return self.mlp(torch.cat([x, c_noise[:, None]], dim=1))


class EDMDenoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Table 1), x [B, ...], sigma [B]."""

    def __init__(self, net, sigma_data=SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x, sigma):
        s = sigma.reshape(-1, *[1] * (x.dim() - 1))  # one sigma per example, for all its entries
        c_skip, c_out, c_in, c_noise = edm_precond(s, self.sigma_data)
        return c_skip * x + c_out * self.net(c_in * x, c_noise.reshape(-1))


# ----------------------------------------------------------------------------- objective
def draw_sigma_and_noise(x, K, generator, p_mean=-1.2, p_std=1.2):
    """K draws per example: ln sigma ~ N(p_mean, p_std^2) [B, K] and n ~ N(0, I) [B, K, *x]."""
    sigma = (p_mean + p_std * torch.randn(x.shape[0], K, generator=generator, dtype=x.dtype)).exp()
    n = torch.randn(x.shape[0], K, *x.shape[1:], generator=generator, dtype=x.dtype)
    return sigma, n


def edm_loss(denoiser, x0, sigma, n, sigma_data=SIGMA_DATA):
    """Per-example EDM loss [B], each the mean over its K draws (noise multiplicity).

    The randomness comes in as data (sigma, n), so the same call gives the same loss inside
    vmap and in a plain loop. The K draws are folded into the batch the network sees."""
    B, K = sigma.shape
    x_k = x0.unsqueeze(1).expand(B, K, *x0.shape[1:]).reshape(B * K, *x0.shape[1:])
    s = sigma.reshape(B * K)
    y = x_k + s.reshape(-1, *[1] * (x0.dim() - 1)) * n.reshape(B * K, *x0.shape[1:])
    # lambda(sigma) = 1 / c_out^2, EDM Table 1
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    err = (denoiser(y, s) - x_k).pow(2).flatten(1).mean(1)
    return (weight * err).reshape(B, K).mean(1)


# ----------------------------------------------------------------------------- DP-SGD
def check_no_batchnorm(model):
    """Refuse layers that mix examples: with them one example's gradient depends on the others."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"layer '{name}' ({type(module).__name__}) normalises each example with statistics "
                "of the whole batch, so changing one example changes every other example's "
                "gradient: the per-example sensitivity C that DP-SGD relies on no longer holds "
                "(and its running statistics are computed from private data without noise). "
                "Replace it by nn.GroupNorm(num_groups, num_channels), which normalises each "
                "example on its own.")


def per_example_grads(model, loss_fn, *batch, chunk_size=None):
    """(grads {name: [B, *param.shape]}, losses [B]): each example's loss and its gradient.

    loss_fn(model, *batch) -> per-example losses [B], for any callable `model`. vmap runs the
    gradient of ONE example's loss over the batch; chunk_size bounds how many examples vmap
    processes at once, hence the activation memory (K draws make each example K times larger).
    """
    check_no_batchnorm(model)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss_of_one(params, *example):
        stateless_model = lambda *inputs: functional_call(model, (params, buffers), inputs)
        return loss_fn(stateless_model, *[t.unsqueeze(0) for t in example])[0]  # batch of one

    # grad_and_value: the loss comes with its gradient at no extra cost. randomness="different":
    # dropout, if any, draws a different mask for every example.
    return vmap(grad_and_value(loss_of_one), in_dims=(None,) + (0,) * len(batch),
                chunk_size=chunk_size, randomness="different")(params, *batch)


def naive_per_example_grads(model, loss_fn, *batch):
    """The slow, obviously correct reference: one backward pass per example; (grads, losses)."""
    names, params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad])
    losses = [loss_fn(model, *[t[i:i + 1] for t in batch])[0] for i in range(batch[0].shape[0])]
    rows = [torch.autograd.grad(loss, params) for loss in losses]
    grads = {k: torch.stack([row[j] for row in rows]) for j, k in enumerate(names)}
    return grads, torch.stack(losses).detach() if losses else torch.zeros(0)


def per_example_norms(grads):
    """||g_i||_2 over ALL parameters flattened together: shape [B]."""
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def clip_per_example(grads, C):
    """g_i * min(1, C / ||g_i||): every example's total (flat) norm becomes <= C."""
    if not C > 0:
        raise ValueError(f"clipping norm C must be > 0 (use math.inf for no clipping), got {C}")
    norms = per_example_norms(grads)
    factor = (C / (norms + 1e-12)).clamp(max=1.0)  # 1e-12: no 0/0; norms below C keep factor 1
    return {k: g * factor.reshape(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}


MT_WORDS = 624  # torch's CPU generator is a Mersenne Twister (MT19937): 624 words of 32 bits


def fill_generator_state(gen, random_bytes):
    """Make 4 * 624 random bytes the whole state of torch's CPU generator; returns gen.

    manual_seed cannot do this: it keeps the low 32 bits of any seed. get_state() is a byte copy
    of torch's CPUGeneratorImplState: uint64 initial seed, int32 left, int32 seeded, uint64 next,
    624 uint64 slots of one 32-bit word each, then a cached normal sample and its valid flags."""
    words = struct.unpack(f"={MT_WORDS}I", random_bytes)
    # left = 1, next = 0: the first draw twists the state first, as right after manual_seed
    head = struct.pack(f"=QiiQ{MT_WORDS}Q", 0, 1, 1, 0, *words)
    tail = bytes(gen.get_state().numel() - len(head))  # zeros: no cached normal sample
    gen.set_state(torch.frombuffer(bytearray(head + tail), dtype=torch.uint8))
    return gen


def secret_generator(device="cpu", insecure_seed=None):
    """The mechanism's randomness: a generator whose whole state is OS entropy, never shown.

    Whoever knows every example but one AND the seed replays training with and without that
    example and sees which run gives the released model, however large the noise. Secret bits:
    on CPU 624 x 32 = 19,968 from Python's secrets fill the Mersenne Twister (19,937 matter: its
    first twist keeps only the top bit of word 0); on CUDA 64, Philox's whole seed.
    insecure_seed (debugging, tests) hashes the seed into the same full state, so seeds that
    differ only above bit 32 still differ; it voids the privacy guarantee."""
    n_bytes = 4 * MT_WORDS if torch.device(device).type == "cpu" else 8
    if insecure_seed is None:
        random_bytes = secrets.token_bytes(n_bytes)
    else:
        random_bytes = hashlib.shake_256(str(insecure_seed).encode()).digest(n_bytes)
    gen = torch.Generator(device)
    if gen.device.type == "cpu":
        return fill_generator_state(gen, random_bytes)
    return gen.manual_seed(int.from_bytes(random_bytes, "little"))


def add_dp_noise(summed, noise_multiplier, C, generator):
    """summed + N(0, noise_multiplier^2 C^2 I): noise std is proportional to the sensitivity C.

    generator must be secret (secret_generator()): noise that can be replayed protects nothing."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if noise_multiplier > 0 and not math.isfinite(C):
        raise ValueError("noise needs a finite clipping norm C: "
                         "the noise std is noise_multiplier * C")
    std = noise_multiplier * C if noise_multiplier > 0 else 0.0
    return {k: s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
            for k, s in summed.items()}


def poisson_sample(n, q, generator):
    """Indices of a Poisson-subsampled batch: each of n examples joins independently w.p. q.

    The batch size is random (Binomial(n, q), it can be 0). The accountant's privacy
    amplification by subsampling is proven for THIS mechanism; shuffling the data and cutting
    fixed-size batches is a different mechanism (every example is used exactly once an epoch)
    and the Poisson numbers do not certify it."""
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q}")
    return torch.nonzero(torch.rand(n, generator=generator) < q).flatten()


def private_gradient(model, loss_fn, *batch, C, noise_multiplier, expected_batch_size,
                     generator, chunk_size=None):
    """(sum_i clip(g_i) + N(0, noise_multiplier^2 C^2 I)) / (qN), and info = {"norms": unclipped
    per-example gradient norms [B], "losses": per-example losses [B]}.

    Memory stays bounded: per-example gradients live only one chunk at a time. info is NOT
    private (no noise): use it to look, as the demo does, never publish or tune C on it."""
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size = qN must be > 0, got {expected_batch_size}")
    summed = {k: torch.zeros_like(p) for k, p in model.named_parameters() if p.requires_grad}
    B, step = batch[0].shape[0], chunk_size or max(batch[0].shape[0], 1)
    norms, losses = [], []
    for start in range(0, B, step):  # an empty batch skips this loop: a noise-only step
        grads, loss = per_example_grads(model, loss_fn, *[t[start:start + step] for t in batch])
        norms.append(per_example_norms(grads))
        losses.append(loss)
        for k, g in clip_per_example(grads, C).items():
            summed[k] += g.sum(0)
    noisy = add_dp_noise(summed, noise_multiplier, C, generator)
    # Divide by the EXPECTED size qN, a public constant, not the realised |B|: |B| depends on
    # who was sampled, so it is private itself, and dividing by it would make one example
    # change the denominator too, leaving the sensitivity-C analysis of the sum (it can be 0).
    grads = {k: g / expected_batch_size for k, g in noisy.items()}
    cat = lambda chunks: torch.cat(chunks) if chunks else torch.zeros(0)
    return grads, {"norms": cat(norms), "losses": cat(losses)}


def dp_sgd_step(model, optimizer, loss_fn, *batch, C, noise_multiplier, expected_batch_size,
                generator, chunk_size=None):
    """One DP-SGD update on a Poisson-sampled batch; returns private_gradient's info."""
    grads, info = private_gradient(model, loss_fn, *batch, C=C, noise_multiplier=noise_multiplier,
                                    expected_batch_size=expected_batch_size, generator=generator,
                                    chunk_size=chunk_size)
    for k, p in model.named_parameters():
        if k in grads:
            p.grad = grads[k]
    optimizer.step()  # post-processing of a private gradient: no extra privacy cost
    return info


# ----------------------------------------------------------------------------- training
def train(args, K, C, noise_multiplier, x_train, eval_batch, label):
    """DP-SGD with Adam on the toy data; returns the model and its held-out loss curve.
    The initial weights are public (--seed); all that training draws is secret."""
    torch.manual_seed(args.seed)  # same initial weights for every run
    model = EDMDenoiser(ToyMLP(args.hidden))
    gen = secret_generator(insecure_seed=args.insecure_noise_seed)
    if args.insecure_noise_seed is not None:
        print(f"  [{label}] privacy guarantee void: noise seed known "
              f"(--insecure-noise-seed {args.insecure_noise_seed})")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    N, curve, t0 = x_train.shape[0], [], time.time()
    for step in range(args.steps + 1):
        if step % 50 == 0:
            with torch.no_grad():
                curve.append((step, edm_loss(model, *eval_batch).mean().item()))
            rate = step / (time.time() - t0 + 1e-9)
            speed = f"{rate:4.0f} steps/s, ~{(args.steps - step) / rate:2.0f}s left" if step else ""
            print(f"  [{label}] step {step:4d}  held-out loss {curve[-1][1]:.4f}  {speed}")
        if step == args.steps:
            return model, curve
        x = x_train[poisson_sample(N, args.q, gen)]
        dp_sgd_step(model, opt, edm_loss, x, *draw_sigma_and_noise(x, K, gen), C=C,
                    noise_multiplier=noise_multiplier, expected_batch_size=args.q * N,
                    generator=gen)


# ----------------------------------------------------------------------------- evaluation
def flat(grads):
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)  # [B, P]


def plot_clipping_and_noise(args, models, x, gen):
    """Left: norms before/after clipping. Right: ||sum of clipped g_i|| vs the noise norm."""
    batch = (x, *draw_sigma_and_noise(x, 4, gen))
    raw = {name: per_example_grads(m, edm_loss, *batch)[0] for name, m in models.items()}
    clipped = flat(clip_per_example(raw["trained model"], args.clip))
    sizes = [2**i for i in range(int(math.log2(x.shape[0])) + 1)]
    signal = [clipped[:b].sum(0).norm().item() for b in sizes]
    zeros = {"all": torch.zeros(clipped.shape[1])}
    # an illustration from the public generator: nothing trained or released depends on this draw
    noise = add_dp_noise(zeros, args.noise_multiplier, args.clip, gen)["all"].norm().item()
    print(f"   {clipped.shape[1]} parameters: noise norm {noise:.1f} (noise_multiplier C sqrt(P) = "
          f"{args.noise_multiplier * args.clip * clipped.shape[1] ** 0.5:.1f}); signal norm "
          f"{signal[0]:.2f} at B=1, {signal[-1]:.1f} at B={sizes[-1]}")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = torch.logspace(-2, 2, 50).numpy()
    for name, g in raw.items():
        ax[0].hist(per_example_norms(g).numpy(), bins, alpha=0.5, label=f"before clipping ({name})")
    ax[0].hist(clipped.norm(dim=1).numpy(), bins, histtype="step", color="k",
               label="after clipping (trained model)")
    ax[0].axvline(args.clip, color="r", ls="--", label=f"C = {args.clip}")
    ax[0].set(xscale="log", xlabel="per-example gradient norm ||g_i|| (K=4)", ylabel="examples",
              title="Clipping caps every example at C")
    ax[1].loglog(sizes, signal, "o-", label="signal ||sum_i clip(g_i)||")
    ax[1].axhline(noise, color="r", ls="--", label="noise ||N(0, (noise multiplier C)^2 I)||")
    ax[1].axvline(args.q * args.n_data, color="gray", ls=":", label="expected batch qN")
    ax[1].set(xlabel="batch size B", ylabel="L2 norm", title="Noise is fixed; signal grows with B")
    ax[0].legend(fontsize=7, loc="upper left")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "clipping_and_noise.png", dpi=80)


def gradient_variance(model, x, K, C, gen, repeats=16):
    """One example's gradient over fresh diffusion-noise draws, averaged over the examples x:
    raw variance E||g_i - E g_i||^2, clipped variance, and the mean gradient's ||E g_i||^2."""
    raw, clipped = [], []
    for _ in range(repeats):
        g, _ = per_example_grads(model, edm_loss, x, *draw_sigma_and_noise(x, K, gen))
        raw.append(flat(g))
        clipped.append(flat(clip_per_example(g, C)))
    raw, clipped = torch.stack(raw), torch.stack(clipped)  # [repeats, B, P]
    v_raw, v_clip = [r.var(0).sum(1).mean().item() for r in (raw, clipped)]
    # ||mean of repeats||^2 overshoots ||E g_i||^2 by the variance of the mean, v_raw / repeats
    return v_raw, v_clip, raw.mean(0).pow(2).sum(1).mean().item() - v_raw / repeats


def plot_noise_multiplicity(args, model, x, runs, gen):
    """Left: per-example gradient variance vs K, raw and clipped. Right: DP training curves."""
    Ks = [1, 2, 4, 8, 16, 32]
    var = [gradient_variance(model, x, K, args.clip, gen) for K in Ks]
    signal = var[-1][2]  # ||E g_i||^2, best measured at the largest K
    print(f"   E||g_i - E g_i||^2 over diffusion draws, mean over {x.shape[0]} examples. "
          "K iid draws averaged: raw = raw(K=1)/K, i.e. K raw / raw(K=1) = 1.\n"
          "   Clipped: <= C^2 = "
          f"{args.clip**2:g}, near it while raw >> ||E g_i||^2 = {signal:.1f}, then ~1/K too")
    for K, (v_raw, v_clip, _) in zip(Ks, var):
        print(f"   K={K:2d}: raw {v_raw:8.4f} (K raw / raw(K=1) = {K * v_raw / var[0][0]:.2f}), "
              f"clipped {v_clip:.4f}")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].loglog(Ks, [v[0] for v in var], "o-", label="raw g_i (measured)")
    ax[0].loglog(Ks, [var[0][0] / K for K in Ks], "k:", label="raw(K=1) / K")
    ax[0].loglog(Ks, [v[1] for v in var], "s-", label="clipped g_i (measured)")
    ax[0].loglog(Ks, [var[-1][1] * Ks[-1] / K for K in Ks], "k--", lw=0.8, label="slope 1/K")
    ax[0].axhline(args.clip**2, color="r", ls="--", label="C^2: cap on the clipped variance")
    ax[0].axhline(signal, color="gray", ls="-.", label="||E g_i||^2: mean gradient, squared")
    ax[0].set(xlabel="noise multiplicity K", ylabel="E||g_i - E g_i||^2",
              title="Raw variance ~ 1/K. Clipped: near C^2 while raw >>\n"
                    "||E g_i||^2 (g_i/||g_i|| is noise), then ~1/K too")
    for label, (_, curve) in runs.items():
        ax[1].plot(*zip(*curve), "--" if "non" in label else "-", label=label)
    ax[1].set(xlabel="step", ylabel="held-out EDM loss",
              title="Same privacy cost for every K; one run (secret noise)")
    ax[0].set_ylim(top=30 * var[0][0])  # room for the legend above the curves
    ax[0].legend(fontsize=7, loc="upper right", ncol=2)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "noise_multiplicity.png", dpi=80)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start, gen = time.time(), torch.Generator().manual_seed(args.seed)
    x_train, x_eval = sample_toy_data(args.n_data, gen), sample_toy_data(2000, gen)
    eval_batch = (x_eval, *draw_sigma_and_noise(x_eval, 8, gen))  # fixed draws: comparable curves
    print(f"N={args.n_data}, q={args.q} (expected batch {args.q * args.n_data:.0f}), "
          f"{args.steps} steps, C={args.clip}, noise multiplier {args.noise_multiplier}: the same "
          "(epsilon, delta) for every K -- chapter 03 computes it")
    if args.insecure_noise_seed is not None:
        print("!! --insecure-noise-seed: privacy guarantee void: noise seed known (debugging only)")

    print("1) training: non-private reference (C=inf, noise multiplier 0), then DP-SGD for each K")
    runs = {"non-private, K=1": train(args, 1, math.inf, 0.0, x_train, eval_batch, "non-DP")}
    for K in args.ks:
        runs[f"DP, K={K}"] = train(args, K, args.clip, args.noise_multiplier, x_train, eval_batch,
                                   f"DP K={K}")
    model = runs[f"DP, K={args.ks[-1]}"][0]

    print("2) per-example gradient norms, and signal vs noise as the batch grows")
    torch.manual_seed(args.seed)  # the initial weights that every run started from
    models = {"initial model": EDMDenoiser(ToyMLP(args.hidden)), "trained model": model}
    plot_clipping_and_noise(args, models, x_train[:4096], gen)

    print("3) noise multiplicity: per-example gradient variance and DP training loss vs K")
    plot_noise_multiplicity(args, model, x_train[:64], runs, gen)
    last = lambda curve: sum(loss for _, loss in curve[-4:]) / len(curve[-4:])
    print("final held-out loss, mean of the last 4 evaluations (secret noise: every run differs): "
          + ", ".join(f"{k}: {last(c):.4f}" for k, (_, c) in runs.items()))
    print(f"figures in {args.out}/ ; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
