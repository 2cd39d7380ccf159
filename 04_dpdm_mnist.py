"""Chapter 04 - Differentially Private Diffusion Models (DPDM) on MNIST, end to end.

`python 04_dpdm_mnist.py --eps 10` trains a class-conditional diffusion model with DP-SGD at
(eps, delta = 1e-5), samples from it, and evaluates the samples as the paper does.

Part I is the method, to be read top to bottom (DPDM = Dockhorn, Cao, Vahdat, Kreis, "Differentially
Private Diffusion Models", TMLR 2023; EDM = Karras et al. 2022):
  1. the EDM denoiser and its loss with noise multiplicity K (DPDM Sec. 3.2): K noise draws per
     example, still ONE example and ONE clipped gradient, so K lowers the variance for free;
  2. DP-SGD (DPDM Alg. 1): Poisson sampling, per-example clipping, Gaussian noise, all drawn from
     secret randomness;
  3. the Renyi-DP accountant, which calibrates the noise so that eps never exceeds the target;
  4. DPDM's samplers: EDM's churn sampler, DDIM, classifier-free guidance, v-prediction at eps < 1.
Part II is infrastructure a reader may skim: the U-Net, data, files (what is safe to publish),
torchrun, evaluation (FID; classifiers trained on samples, tested on real data), command line.
Chapters 01-03 teach each piece alone; this file repeats what it needs so that it runs alone.
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
import signal
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
def option(default, help, runtime=False, **kw):
    """A config field with its --help text. runtime=True: changes speed or output, not the model."""
    return field(default=default, metadata={"help": help, "runtime": runtime, **kw})


@dataclass
class Config:
    """What is trained: model, objective and DP-SGD. Defaults are DPDM's MNIST configuration."""
    dataset: str = option("mnist", "mnist | fmnist | celeba (32x32, unconditional)",
                          choices=("mnist", "fmnist", "celeba"))
    channels: int = option(32, "U-Net base channels")
    mults: tuple = option((1, 2, 2), "U-Net channel multiplier per resolution, e.g. 1,2,2")
    blocks: int = option(2, "residual blocks per resolution")
    attn: tuple = option((7,), "resolutions with self-attention, e.g. 7 or 16,8")
    unshuffle: int = option(1, "2: the U-Net sees pixel-unshuffled images (14x14x4 for MNIST)")
    noise_channels: int = option(0, "width of the noise-level and label embedding; 0: --channels "
                                    "(DDPM++; DPDM's is 32)")
    param: str = option("auto", "edm | v | auto (v-prediction if eps < 1, else edm, as DPDM)")
    p_mean: float = option(-1.2, "EDM training noise levels: ln sigma ~ N(p_mean, p_std^2)")
    p_std: float = option(1.2, "see --p-mean")
    logsnr_min: float = option(-9.0, "v-prediction: log-SNR range of the cosine schedule")
    logsnr_max: float = option(13.0, "see --logsnr-min")
    K: int = option(32, "noise multiplicity: diffusion-noise draws per example (DPDM Sec. 3.2)")
    label_dropout: float = option(0.1, "probability of the null label (trains classifier-free guidance)")
    eps: float = option(10.0, "target epsilon of (eps, delta)-DP; DPDM: 10, 1 or 0.2")
    delta: float = option(None, "delta; default 1e-5 (CelebA 1e-6); must be < 1/N")
    batch: int = option(4096, "expected batch size: Poisson rate q = 1/ceil(N/batch), as Opacus")
    epochs: float = option(300.0, "training length: steps = epochs * ceil(N/batch)")
    clip: float = option(1.0, "C, the per-example clipping norm")
    lr: float = option(3e-4, "Adam learning rate")
    ema: float = option(0.999, "EMA decay of the weights (warm-up min(ema, (1+n)/(10+n)))")
    seed: int = option(0, "PUBLIC randomness only: initial weights, sampling, evaluation")
    chunk: int = option(16, "examples per vmap call; memory grows with chunk x K", runtime=True)
    ckpt_every: int = option(100, "steps between checkpoints", runtime=True)
    log_every: int = option(10, "steps between progress lines", runtime=True)

    def __post_init__(self):
        if self.param == "auto":  # DPDM: EDM at eps = 10 and 1, v-prediction at eps = 0.2
            self.param = "v" if self.eps < 1 else "edm"
        if self.delta is None:
            self.delta = 1e-6 if self.dataset == "celeba" else 1e-5


@dataclass
class SamplerConfig:
    """How samples are drawn from a trained model (post-processing: no privacy cost)."""
    sampler: str = option("ddim", "churn | heun | ddim | ddim-stochastic",
                          choices=("churn", "heun", "ddim", "ddim-stochastic"))
    sample_steps: int = option(50, "number of noise levels N")
    s_churn: float = option(0.0, "churn: S_churn (gamma = min(S_churn/N, 1) inside [S_min, S_max])")
    s_min: float = option(0.05, "churn: S_min")
    s_max: float = option(50.0, "churn: S_max")
    s_noise: float = option(1.0, "churn: S_noise")
    guidance: float = option(0.0, "classifier-free guidance scale w: (1+w) D(x|y) - w D(x|null)")
    sigma_min: float = option(0.002, "lowest noise level")
    sigma_max: float = option(80.0, "highest noise level")
    rho: float = option(7.0, "EDM's time-step exponent")
    num_samples: int = option(10_000, "images to generate")


@dataclass(frozen=True)
class Dataset:
    channels: int
    resolution: int
    classes: int                                 # 0: unconditional
    paper: dict = field(default_factory=dict)    # DPDM's config where it differs from MNIST's


DATASETS = {"mnist": Dataset(1, 28, 10), "fmnist": Dataset(1, 28, 10),
            "celeba": Dataset(3, 32, 0, paper=dict(batch=2048, attn=(16, 8)))}  # q = 1/80


@dataclass(frozen=True)
class Preset:
    train: dict          # Config overrides
    sampler: object      # SamplerConfig overrides, or "acc" / "fid": the paper's setting for the run
    eval_epochs: dict    # classifier epochs (DPDM: 50 each)
    val_samples: int     # a second generated set chooses the epoch (DPDM); 0: hold out 10 % instead
    time: str            # what the user should expect


PRESETS = {
    # DPDM's released MNIST config: 1.75M-parameter DDPM++, q = 1/15 (expected batch 4000),
    # 300 epochs = 4,500 steps, K = 32; noise multiplier 2.487 at eps = 10. Evaluation as
    # DPDM's train_downstream_classifiers.py: 60k samples, 50 epochs, a second generated set.
    "paper": Preset({}, "acc", dict(logreg=50, mlp=50, cnn=50), 10_000,
                    "~50 A100-hours (a third-party rerun: 13 h on 4x A100)"),
    # One GPU: the paper's model and batch, K = 4 and 60 epochs (900 steps), 40x less compute.
    "gpu": Preset(dict(K=4, epochs=60.0, chunk=128), {}, dict(logreg=50, mlp=50, cnn=50), 0,
                  "about an hour on one modern GPU (an estimate, not measured)"),
    # One CPU core in <= 15 min: a 50k-parameter U-Net on 14x14x4 pixel-unshuffled images, with
    # DPDM's 32-wide noise/label embedding (README: how it was chosen). At this compute the DP
    # noise limits quality, yet more, noisier steps beat fewer, cleaner ones (batch 250, not 1000).
    # chunk 320 > a Poisson batch of 250 (standard deviation 16): one vmap call per step.
    # Noise levels ln sigma ~ N(1, 1.2^2), above EDM's N(-1.2, 1.2^2): DPDM focuses training on high
    # sigma, where the digits' shapes form. Nearly every per-example gradient is clipped to C, so
    # how often each sigma is drawn, not the loss weight lambda(sigma), sets its share of the update.
    # Guidance 0.25, DPDM's own for MNIST at eps = 10 ("FID" setting): 0.5 draws cleaner digits of
    # less variety, and classifiers trained on them score a point lower.
    "cpu": Preset(dict(channels=8, noise_channels=32, mults=(1, 2), blocks=1, attn=(7,), unshuffle=2,
                       K=1, batch=250, epochs=7.0, lr=3e-3, p_mean=1.0, chunk=320, ckpt_every=200),
                  dict(sampler="heun", sample_steps=8, guidance=0.25),
                  dict(logreg=30, mlp=30, cnn=15), 0,
                  "~13 min on one CPU core: training 10.5, sampling 1.5, evaluation 1.5"),
    # seconds on tiny data, for the tests
    "smoke": Preset(dict(channels=8, mults=(1, 2), blocks=1, attn=(7,), unshuffle=2, K=2, batch=32,
                         epochs=2.0, lr=1e-3, chunk=16, ckpt_every=2, log_every=1),
                    dict(sample_steps=4, num_samples=20), dict(logreg=1, mlp=1, cnn=1), 0,
                    "seconds on the tests' tiny data; minutes on real MNIST"),
}

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
    """SamplerConfig overrides of the paper's setting, and a note if the nearest published eps stood in."""
    published = [e for d, e, s in PAPER_SAMPLERS if d == dataset and s == setting]
    if not published:
        raise UserError(f"the paper publishes sampler settings for mnist and fmnist only, not "
                        f"{dataset}: choose --sampler etc. yourself")
    near = min(published, key=lambda e: abs(math.log(e / eps)))
    note = "" if near == eps else f" (no published setting for eps = {eps}: the one for eps = {near})"
    return dict(sampler="churn", sample_steps=1000, **PAPER_SAMPLERS[dataset, near, setting]), note


# ----------------------------------------------------------------------------- denoiser and objective
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
        self.net, self.param = net, param
        self.sigma_data = SIGMA_DATA if param == "edm" else 1.0
        self.n_classes, self.img_shape = net.n_classes, net.img_shape

    def forward(self, x, sigma, y):
        sigma = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        if self.param == "v":
            c_noise = torch.atan(sigma) * 2 / math.pi
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten(), y).float()


def draw_sigma_and_noise(x, K, generator, p_mean=-1.2, p_std=1.2, param="edm", logsnr=(-9.0, 13.0)):
    """K training noise levels per example and their noise: sigma [B, K], n [B, K, *x.shape[1:]].
    edm: ln sigma ~ N(p_mean, p_std^2). v: t uniform over the cosine schedule's log-SNR range,
    sigma = tan(pi t / 2): more weight on high noise, which DPDM found crucial at strong privacy."""
    b, dev = len(x), generator.device
    if param == "edm":
        sigma = (p_mean + p_std * torch.randn(b, K, generator=generator, device=dev)).exp()
    else:
        t_lo, t_hi = (2 / math.pi * math.atan(math.exp(-s / 2)) for s in (logsnr[1], logsnr[0]))
        t = t_lo + (t_hi - t_lo) * torch.rand(b, K, generator=generator, device=dev)
        sigma = torch.tan(math.pi * t / 2)
    return sigma, torch.randn(b, K, *x.shape[1:], generator=generator, device=dev)


def edm_loss(denoiser, x0, sigma, n, sigma_data=SIGMA_DATA):
    """Per-example loss [B]: 1/K sum_k lambda(sigma_k) |D(x0 + sigma_k n_k; sigma_k) - x0|^2 (mean over
    pixels), lambda = 1 / c_out^2 (EDM Table 1). The K draws are folded into the network's batch."""
    b, K = sigma.shape
    xk = x0.unsqueeze(1).expand(b, K, *x0.shape[1:]).reshape(b * K, *x0.shape[1:])
    s = sigma.reshape(b * K, *[1] * (x0.dim() - 1))
    weight = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    err = weight * (denoiser(xk + s * n.reshape(xk.shape), s) - xk) ** 2
    return err.reshape(b, -1).mean(1)


def dpdm_loss(model, x, y, sigma, n, sigma_data):
    """DP-SGD's loss_fn: the class-conditional EDM loss of each example (y may be the null label)."""
    K = sigma.shape[1]
    return edm_loss(lambda xk, s: model(xk, s, y.repeat_interleave(K)), x, sigma, n, sigma_data)


# ----------------------------------------------------------------------------- DP-SGD
def secret_generator(device="cpu", insecure_seed=None):
    """The generator of ALL training randomness (Poisson batches, diffusion noise, DP noise).
    DP's adversary knows every training image but one; given a seed they can read (--seed, a log),
    they could replay training with and without that image: certainty, at any eps. Hence 63 bits
    of OS entropy, never printed, its state kept only in the private resume file. (torch's generator
    is no CSPRNG: a deployment would use one, and Opacus' secure_mode, Mironov 2012.)
    insecure_seed: reproducible noise for tests; it voids the guarantee and the run says so."""
    seed = secrets.randbits(63) if insecure_seed is None else insecure_seed
    if dist.is_initialized():  # DIST: every process must draw the same noise: rank 0's secret
        shared = torch.tensor([seed], dtype=torch.int64, device=device)
        dist.broadcast(shared, 0)
        seed = int(shared)
    return torch.Generator(device).manual_seed(seed)


def poisson_sample(n, q, generator):
    """Each example joins independently with probability q (the batch may be empty): the
    accountant's amplification by subsampling is proven for THIS, not for shuffled fixed batches."""
    return torch.nonzero(torch.rand(n, generator=generator, device=generator.device) < q).flatten()


def batch_randomness(x, y, cfg, n_classes, generator):
    """Label dropout (the null label n_classes trains guidance), then K noise levels and noises per
    example: drawn before the batch is cut into chunks or processes, which change speed, not results."""
    drop = torch.rand(len(y), generator=generator, device=generator.device) < cfg.label_dropout
    sigma, n = draw_sigma_and_noise(x, cfg.K, generator, cfg.p_mean, cfg.p_std, cfg.param,
                                    (cfg.logsnr_min, cfg.logsnr_max))
    return x, torch.where(drop, n_classes, y), sigma, n


def per_example_grads(model, loss_fn, *batch, chunk_size=None):
    """({name: [B, *param.shape]}, losses [B]): the gradient of ONE example's loss, vmapped over the batch."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss_of_one(p, *example):
        stateless_model = lambda *inputs: functional_call(model, p, inputs)
        return loss_fn(stateless_model, *[t.unsqueeze(0) for t in example])[0]

    return vmap(grad_and_value(loss_of_one), in_dims=(None,) + (0,) * len(batch),
                chunk_size=chunk_size)(params, *batch)


def per_example_norms(grads):
    """||g_i||_2 over ALL parameters flattened together: shape [B]."""
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def clip_per_example(grads, C):
    """g_i min(1, C / ||g_i||): every example's flat gradient gets norm <= C, small ones are kept."""
    factor = (C / (per_example_norms(grads) + 1e-12)).clamp(max=1.0)
    return {k: g * factor.reshape(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}


def add_dp_noise(summed, noise_multiplier, C, generator):
    """The Gaussian mechanism: summed + N(0, noise_multiplier^2 C^2 I); C is the clipped sum's sensitivity."""
    return {k: s + noise_multiplier * C * torch.randn(s.shape, generator=generator, device=s.device)
            for k, s in summed.items()}


BF16_ON_GPU = True  # the network's forward and backward passes in bf16 on a GPU (fp32: False)
PAD_TO = 16  # a short chunk is padded to a multiple of 16 rows, never past the chunk size (memory):
# a Poisson batch has a new size at every step, and on a CPU each new shape costs (cpu preset's DP
# step 446 -> 388 ms in benchmarks/bench_04_step.py)


def padded_size(rows, chunk):
    """rows rounded up to a multiple of PAD_TO, but never past the chunk (--chunk bounds memory)."""
    return min(-(-rows // PAD_TO) * PAD_TO, chunk)


def pad_rows(tensors, size):
    """Repeat the first row until there are `size` rows; the padded rows' gradients are computed
    and then dropped, so they never reach the clipped sum."""
    extra = size - len(tensors[0])
    return [torch.cat([t, t[:1].expand(extra, *t.shape[1:])]) for t in tensors]


def private_gradient(model, loss_fn, *batch, C, noise_multiplier, expected_batch_size, generator,
                     chunk_size=None):
    """g = (sum_i clip_C(g_i) + N(0, noise_multiplier^2 C^2 I)) / (qN), and info {"norms", "losses"}
    (statistics of private data: look at them, never publish them). Dividing by the EXPECTED batch
    size qN keeps the sensitivity at C/(qN) whoever was sampled. Per-example gradients exist one
    chunk at a time (bf16 network on a GPU, fp32 DP arithmetic). DIST: process r of R clips the r-th
    share of the batch; after the all-reduce every process holds the whole sum and adds the same
    noise (same generator state), so the noise enters once."""
    rank, size = world()
    b = len(batch[0])
    share = -(-b // size)
    first, last, step = rank * share, min(b, (rank + 1) * share), chunk_size or max(b, 1)
    summed = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in model.named_parameters()}
    norms, losses = [torch.zeros(0, device=batch[0].device)], [torch.zeros(0, device=batch[0].device)]
    for i in range(first, last, step):  # an empty batch skips the loop: a noise-only step
        rows = min(i + step, last) - i
        chunk = pad_rows([t[i:i + rows] for t in batch], padded_size(rows, step))
        with torch.autocast("cuda", torch.bfloat16, enabled=BF16_ON_GPU and batch[0].is_cuda):
            grads, loss = per_example_grads(model, loss_fn, *chunk)
        grads = {k: g[:rows].float() for k, g in grads.items()}  # the padding's rows dropped here
        norms.append(per_example_norms(grads))
        losses.append(loss[:rows].float())
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
    grads, info = private_gradient(model, loss_fn, *batch, C=C, noise_multiplier=noise_multiplier,
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
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------- accountant
# As chapter 03 but shorter: RDP by numerical integration of its defining expectation instead
# of 03's series (the same numbers; the tests compare), over a coarser grid of orders.
RDP_ORDERS = np.concatenate([np.arange(1.25, 12, 0.25), np.arange(12, 257)])


def rdp_subsampled_gaussian(q, noise_multiplier, orders=RDP_ORDERS):
    """RDP of one step at real orders a > 1 (Mironov, Talwar, Zhang 2019, Sec. 3.3), s = noise_multiplier:
        eps(a) = log A_a / (a - 1),  A_a = E_{z ~ N(0, s^2)} [(1 - q + q e^{(2z - 1)/(2 s^2)})^a],
    the a-th moment of the likelihood ratio "with" vs "without" one example. Trapezoid rule in log
    space (A_a reaches e^1000s), step s/20: for this smooth integrand, accurate beyond float64."""
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
    rdp, a = steps * rdp_subsampled_gaussian(q, noise_multiplier, orders), orders
    return float(np.min(rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)))


def get_noise_multiplier(target_epsilon, delta, sample_rate, steps):
    """The smallest noise multiplier (to 1e-4 relative) with eps <= target: bisection, upper end."""
    eps = lambda s: epsilon_rdp(sample_rate, s, steps, delta)
    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise UserError(f"eps = {target_epsilon} is out of reach even with enormous noise")
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def privacy_plan(cfg, n):
    """q, total steps and the calibrated noise multiplier; refuses an eps or delta that cannot hold."""
    if not cfg.eps > 0:
        raise UserError(f"--eps must be > 0 (got {cfg.eps}); DPDM uses 0.2, 1 or 10")
    if not 0 < cfg.delta < 1 / n:
        raise UserError(f"--delta must be in (0, 1/N) = (0, {1 / n:.3g}) for N = {n} training "
                        f"examples (got {cfg.delta}); the usual choice is 1e-5 for MNIST")
    batches = math.ceil(n / cfg.batch)
    q, steps = 1 / batches, max(1, round(cfg.epochs * batches))
    return q, steps, get_noise_multiplier(cfg.eps, cfg.delta, q, steps)


def privacy_report(cfg, q, noise_multiplier, steps, total_steps, insecure_seed):
    """What the DP guarantee covers: everything here is public knowledge or a DP output."""
    void = insecure_seed is not None
    return {"eps_spent": epsilon_rdp(q, noise_multiplier, steps, cfg.delta), "delta": cfg.delta,
            "eps_target": cfg.eps, "noise_multiplier": noise_multiplier, "q": q, "clip": cfg.clip,
            "steps": steps, "total_steps": total_steps,
            "accountant": "RDP of the Poisson-subsampled Gaussian, Balle et al. 2020 conversion",
            "privacy_guarantee": "VOID: noise seed known (--insecure-noise-seed)" if void else "valid"}


# ----------------------------------------------------------------------------- training
def train(cfg, data, out, device, resume=False, insecure_seed=None, run=None):
    """DP-SGD; returns (EMA denoiser, privacy report, training seconds). run: what the model file
    records besides the model. DIST: every process runs this loop (private_gradient splits the work)."""
    x_train, y_train = (t.to(device) for t in data["train"])
    n = len(x_train)
    q, total_steps, noise_multiplier = privacy_plan(cfg, n)
    torch.manual_seed(cfg.seed)  # public: the initial weights
    model = build_denoiser(cfg).to(device)
    ema, opt = copy.deepcopy(model).requires_grad_(False), torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = secret_generator(device, insecure_seed)
    step, seconds = load_resume_state(out, cfg, n, model, ema, opt, gen) if resume else (0, 0.0)
    loss_fn = functools.partial(dpdm_loss, sigma_data=model.sigma_data)
    report = lambda: privacy_report(cfg, q, noise_multiplier, step, total_steps, insecure_seed)
    print_plan(cfg, model, n, q, total_steps, noise_multiplier, step, insecure_seed)
    t0, start, seen = time.time(), step, 0
    with StopRequest() as stop:
        while step < total_steps:
            idx = poisson_sample(n, q, gen)
            batch = batch_randomness(x_train[idx], y_train[idx], cfg, model.n_classes, gen)
            info = dp_sgd_step(model, opt, loss_fn, *batch, C=cfg.clip, noise_multiplier=noise_multiplier,
                               expected_batch_size=q * n, generator=gen, chunk_size=cfg.chunk)
            step += 1  # the accountant counts every step that released a noisy gradient
            ema_update(ema, model, step, cfg.ema)
            loss, seen = info["losses"].mean().item() if len(info["losses"]) else 0.0, seen + len(idx)
            if any_rank(not math.isfinite(loss), device):  # DIST: all processes stop together
                raise UserError(f"the training loss became {loss} at step {step}: stopped, nothing "
                                f"new saved. Lower --lr (now {cfg.lr}) and start again.")
            stopping = stop.requested_on_any_rank(device)
            if step % cfg.ckpt_every == 0 or step == total_steps or stopping:
                save_run(out, cfg, model, ema, opt, gen, report(), seconds + time.time() - t0, n, run)
            if stopping:
                raise Interrupted(step, total_steps, report()["eps_spent"])
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed, eps = time.time() - t0, report()["eps_spent"]
                print_progress(f"step {step:5d}/{total_steps} | loss {loss:.4f} | eps {eps:.3f}/{cfg.eps}"
                               f" | {seen / elapsed:6.0f} ex/s", step - start, total_steps - start, elapsed)
    return ema, report(), seconds + time.time() - t0


# ----------------------------------------------------------------------------- sampling
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
    t(1 + gamma), gamma = min(S_churn / N, churn_limit) for t in [S_min, S_max] (DPDM's cap is 1;
    EDM's is sqrt 2 - 1), then a Heun step (Euler on the last step, to sigma = 0). Returns the
    last denoiser output, as DPDM does. S_churn = 0 is the deterministic Heun sampler."""
    ts = list(sigmas) + [0.0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        gamma = min(s_churn / len(sigmas), churn_limit) if s_min <= t <= s_max else 0.0
        t_hat = t * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(t_hat ** 2 - t ** 2) * s_noise * torch.randn(
                x.shape, generator=generator, device=x.device)
        d = D(x, t_hat)
        x_next = x + (t_next - t_hat) * (x - d) / t_hat
        if t_next > 0:  # Heun's second-order correction
            x_next = x + (t_next - t_hat) / 2 * ((x - d) / t_hat + (x_next - D(x_next, t_next)) / t_next)
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


def generate(denoiser, sc, num, device, seed, batch=1000):
    """Class-balanced samples (labels 0, 1, .., 9, 0, ..; all 0 if unconditional) as uint8 images
    [num, H, W] (grayscale) or [num, H, W, 3], and their labels. Sampling is post-processing of
    the DP model, so its randomness may be public (--seed)."""
    gen = torch.Generator(device).manual_seed(seed)
    labels = torch.arange(num, device=device) % max(denoiser.n_classes, 1)
    sigmas = edm_sigma_steps(sc.sample_steps, sc.sigma_min, sc.sigma_max, sc.rho)
    xs, t0 = [], time.time()
    for i in range(0, num, batch):
        y = labels[i:i + batch]
        D = guided(denoiser, y, sc.guidance)
        x = sigmas[0] * torch.randn((len(y), *denoiser.img_shape), generator=gen, device=device)
        if sc.sampler == "churn":
            x = sample_churn(D, x, sigmas, sc.s_churn, sc.s_min, sc.s_max, sc.s_noise, gen)
        elif sc.sampler == "heun":
            x = sample_heun(D, x, sigmas)
        else:
            x = sample_ddim(D, x, sigmas, gen, stochastic=sc.sampler == "ddim-stochastic")
        xs.append(x.cpu())
        if i + len(y) < num:
            print_progress(f"  sampled {i + len(y)}/{num}", i + len(y), num, time.time() - t0)
    x = ((torch.cat(xs).permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return (x[..., 0] if x.shape[-1] == 1 else x), labels.cpu().numpy()


# ----------------------------------------------------------------------------- main
def main(argv=None):
    out, t_start = None, time.time()
    try:
        args, cfg, sc = parse_args(argv)
        rank = init_distributed(args)
        torch.set_num_threads(args.threads)
        out = Path(args.out)
        if args.sample_only or args.eval_only:  # from a releasable model file
            refuse_to_overwrite(out, args, SAMPLE_FILES)
            cfg, ema, report, saved = load_model_file(args.ckpt, args.device)
            args.preset, times = args.preset or saved["preset"], {}
            sc = sampler_config(args, cfg, saved["sampler"])
            data = load_data(cfg.dataset, args.data_dir, args.unverified) if args.eval else None
        else:
            refuse_to_overwrite(out, args, RUN_FILES)
            print(f"preset '{args.preset}': {PRESETS[args.preset].time}. DPDM's own configuration: "
                  f"--preset paper")
            data = load_data(cfg.dataset, args.data_dir, args.unverified)
            run = {"preset": args.preset, "sampler": plain(sc)}
            ema, report, train_s = train(cfg, data, out, args.device, args.resume,
                                         args.insecure_noise_seed, run)
            times = {"train_time_s": train_s}
        if dist.is_initialized():  # DIST: sampling, outputs and evaluation are rank 0's
            dist.destroy_process_group()
            if rank > 0:
                return
        churn = f", S_churn {sc.s_churn}, S_min {sc.s_min}, S_max {sc.s_max}" if sc.sampler == "churn" else ""
        print(f"sampling {sc.num_samples} images ({sc.sampler}, {sc.sample_steps} steps{churn}, "
              f"guidance {sc.guidance}) ...")
        t0 = time.time()
        x, y = generate(ema.eval(), sc, sc.num_samples, args.device, cfg.seed)
        times["sample_time_s"] = time.time() - t0
        metrics = save_outputs(out, x, y, cfg, sc, report, times, len(data["train"][0]) if data else None)
        if args.eval:
            t0 = time.time()
            metrics["evaluation"] = evaluate(ema, x, y, data, cfg, sc, args)
            metrics["not_covered_by_dp"]["eval_time_s"] = time.time() - t0
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print_summary(out, args, metrics, time.time() - t_start)
    except UserError as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        print(f"\ninterrupted at step {e.step}/{e.total} (eps spent so far {e.eps:.4f}); "
              f"continue with: {continue_command(argv)}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last checkpoint in {out} is kept. Continue with: "
              f"{continue_command(argv)}", file=sys.stderr)
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


def group_norm(c):  # GroupNorm, never BatchNorm: BN mixes the examples of a batch, so one
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)  # example's gradient would depend on others


class Attention(nn.Module):
    """Single-head self-attention over pixels; residual output scaled by 1/sqrt 2."""
    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

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
        self.norm0, self.conv0 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb, self.norm1 = nn.Linear(emb, cout), group_norm(cout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight), nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout or resample else None
        self.attn = Attention(cout) if attn else None

    def forward(self, x, emb):
        h = F.silu(self.norm0(x))
        if self.resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.resample == "up":
            h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
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
        self.unshuffle, self.n_classes, self.img_shape = unshuffle, n_classes, (img_channels, res, res)
        cin, res, emb = img_channels * unshuffle ** 2, res // unshuffle, 4 * channels
        self.label = nn.Embedding(n_classes + 1, self.noise_channels) if n_classes else None
        self.map = nn.Sequential(nn.Linear(self.noise_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(cin, channels, 3, padding=1)
        self.down, self.up, skips, c = nn.ModuleList(), nn.ModuleList(), [channels], channels
        for level, m in enumerate(mults):
            for _ in range(blocks):
                self.down.append(ResBlock(c, channels * m, emb, attn=res in attn))
                c = channels * m
                skips.append(c)
            if level < len(mults) - 1:
                self.down.append(ResBlock(c, c, emb, "down"))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb, attn=True), ResBlock(c, c, emb)])
        for level, m in reversed(list(enumerate(mults))):
            for i in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), channels * m, emb,
                                        attn=res in attn and i == blocks))
                c = channels * m
            if level > 0:
                self.up.append(ResBlock(c, c, emb, "up"))
                res *= 2
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, cin, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)

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
    return EDMDenoiser(UNet(d.channels, d.resolution, cfg.channels, cfg.mults, cfg.blocks, cfg.attn,
                            d.classes, cfg.unshuffle, cfg.noise_channels), cfg.param)


# ------------------------------------------------- data: IDX files (downloaded, verified), CelebA
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
CLASS_NAMES = {"mnist": [str(i) for i in range(10)],
               "fmnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                          "Sneaker", "Bag", "Boot"]}


def check_idx_file(data, dataset, name, unverified=False):
    """Decompress if gzipped, verify the published checksum, parse the IDX structure: magic
    0x0000 <dtype 0x08 = uint8> <ndim>, ndim big-endian uint32 sizes, then the data."""
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
        if got != want:
            mnist_file = hashlib.sha256(raw).hexdigest() == CHECKSUMS["mnist"][name][1]
            raise UserError(f"{name} is MNIST's file, not {dataset}'s: pass --dataset mnist, or put "
                            f"{dataset}'s files in that folder" if mnist_file else
                            f"{name}: checksum mismatch ({kind} {got} != {want}): not the published "
                            f"{dataset} file (corrupt or another data set). Fetch it again, or pass "
                            f"--unverified to use your own data in IDX format")
    if len(raw) < 8 or raw[:3] != b"\x00\x00\x08" or raw[3] not in (1, 3):
        raise UserError(f"{name}: not an IDX uint8 file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and dims[1:] != [28, 28] or len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise UserError(f"{name}: corrupt IDX file (dims {dims}, {len(raw)} bytes)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def download(dataset, name, cache, mirrors=None):
    """Try each mirror; keep the first copy whose checksum verifies (atomic write)."""
    errors = []
    for base in mirrors or MIRRORS[dataset]:
        try:
            with urllib.request.urlopen(base + name + ".gz", timeout=30) as r:
                data = r.read()
            check_idx_file(data, dataset, name)
        except (OSError, UserError) as e:
            errors.append(f"{base}: {e}")
            continue
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"{name}.{os.getpid()}.part"  # one per process: torchrun ranks race here
        tmp.write_bytes(data)
        os.replace(tmp, cache / (name + ".gz"))
        return data
    raise UserError(f"could not download {name}.gz for {dataset}:\n  " + "\n  ".join(errors))


CELEBA_TRAIN_N = 162_770  # official split: 000001.jpg ... 162770.jpg are "train" (partition 0)
CELEBA_HELP = ("CelebA is not downloaded automatically: get img_align_celeba.zip ('Align&Cropped "
               "Images') from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive link "
               "there) and pass its path, or the unzipped img_align_celeba folder, as --data-dir.")


def load_celeba(path, resolution=32):
    """uint8 (N, 3, res, res) of the official training split from img_align_celeba.zip or its
    folder: centre square crop, then Lanczos resize (StyleGAN's dataset_tool, used by DPDM)."""
    path = Path(path)
    path = path / "img_align_celeba" if (path / "img_align_celeba").is_dir() else path
    if path.suffix == ".zip" and path.is_file():
        archive = zipfile.ZipFile(path)
        names, read = {PurePath(n).name: n for n in archive.namelist()}, archive.read
    elif path.is_dir():
        names, read = {p.name: p for p in path.iterdir()}, Path.read_bytes
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
        crop = Image.fromarray(a[top:top + c, left:left + c]).resize((resolution, resolution), Image.LANCZOS)
        out[i] = np.asarray(crop).transpose(2, 0, 1)
        if (i + 1) % 20_000 == 0:
            print(f"  CelebA: {i + 1}/{len(keep)} images")
    return out


def load_data(dataset, data_dir=None, unverified=False):
    """{"train": (x, y), "test": (x, y) or None}: x float32 [n,C,H,W] in [-1, 1], y int64 (all
    0 for the unconditional CelebA). Reads --data-dir, else the cache ./data/<dataset>,
    downloading what is missing (MNIST and Fashion-MNIST; CelebA must be fetched by hand)."""
    folder = Path(data_dir) if data_dir else Path(__file__).resolve().parent / "data" / dataset
    how = CELEBA_HELP if dataset == "celeba" else (
        f"expected the four files {', '.join(IDX_FILES)} (.gz or raw) of {dataset}, from "
        f"{MIRRORS[dataset][0]}; offline, put them in a folder and pass --data-dir FOLDER")
    if data_dir and not folder.exists():
        raise UserError(f"--data-dir {folder} does not exist; {how}")
    if dataset == "celeba":
        x = torch.from_numpy(load_celeba(folder)) / 127.5 - 1.0
        return {"train": (x, torch.zeros(len(x), dtype=torch.long)), "test": None}
    if data_dir and not folder.is_dir():
        raise UserError(f"--data-dir {folder} is a file, not a folder; {how}")
    arrays = []
    for name in IDX_FILES:
        path = next((folder / f for f in (name + ".gz", name) if (folder / f).exists()), None)
        if path is None and data_dir:
            raise UserError(f"missing {name}(.gz) in {folder}: {how}")
        try:
            data = path.read_bytes() if path else download(dataset, name, folder)
        except UserError as e:
            raise UserError(f"{e}\n{how}")
        arrays.append(check_idx_file(data, dataset, name, unverified and path is not None))
    out = {}
    for split, (xi, yi) in (("train", arrays[:2]), ("test", arrays[2:])):
        if len(xi) != len(yi):
            raise UserError(f"{split}: {len(xi)} images but {len(yi)} labels; {how}")
        x = torch.from_numpy(xi.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
        out[split] = (x, torch.from_numpy(yi.astype(np.int64)))
    return out


# ------------------------------------------------- files: what may be published, what stays private
MODEL_FILE = "model.pt"                    # releasable: config, EMA weights, privacy report
STATE_FILE = "PRIVATE_resume_state.pt"     # for --resume only: holds the noise generator's state
SAMPLE_FILES = ("samples.npz", "grid.png", "metrics.json")
RUN_FILES = (MODEL_FILE, STATE_FILE) + SAMPLE_FILES
FORMAT = 2  # of both .pt files; bumped when their layout changes


class UserError(ValueError):
    """Bad input: the message says what to do. main() prints it and exits with status 1."""


def plain(cfg):
    """A dataclass as JSON-able plain types: what torch.load(weights_only=True) can read back."""
    return json.loads(json.dumps(asdict(cfg)))


def save_atomic(path, obj):
    """Temp file, then os.replace: a kill -9 mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_safely(path, device):
    """torch.load with weights_only=True: tensors and plain types only, so a crafted pickle is
    refused before any of its code can run. Also refuses files of other formats clearly."""
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        if isinstance(e, pickle.UnpicklingError):
            raise UserError(f"{path} holds more than tensors and plain values: refused unread "
                            f"(only files this script wrote are loaded). ({why})")
        raise UserError(f"{path} is truncated or not a torch file ({why})")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} was written by an older version of this script or is not one "
                        f"of its files: train again")
    return obj


def save_run(out, cfg, model, ema, opt, gen, report, train_time_s, n, run=None):
    """At checkpoints: the private resume state, and the releasable model file beside it."""
    rank, size = world()
    if size > 1:  # DIST: a diverged process would be a bug; fail loudly, never silently
        fingerprint = torch.stack([p.double().sum() for p in model.parameters()])
        rank0 = fingerprint.clone()
        dist.broadcast(rank0, 0)
        if not torch.equal(fingerprint, rank0):
            raise RuntimeError(f"rank {rank}'s model differs from rank 0's")
    if rank > 0:
        return
    save_atomic(out / STATE_FILE, {
        "format": FORMAT, "config": plain(cfg), "steps": report["steps"], "n": n,
        "train_time_s": train_time_s, "model": model.state_dict(), "ema": ema.state_dict(),
        "opt": opt.state_dict(), "rng": gen.get_state()})
    save_atomic(out / MODEL_FILE, {"format": FORMAT, "config": plain(cfg), "ema": ema.state_dict(),
                                   "privacy": report, **(run or {})})


def load_resume_state(out, cfg, n, model, ema, opt, gen):
    """Restore a run at its last checkpoint; returns (step, training seconds so far). Steps a
    crash lost after that checkpoint were never released and are redone with the very same
    randomness (the generator state is restored), so eps counts each released step once."""
    path = out / STATE_FILE
    if not path.exists():
        if any((out / name).exists() for name in RUN_FILES):
            raise UserError(f"nothing to resume: {out} holds outputs but no {STATE_FILE}. Start "
                            f"over with --overwrite, or choose another --out.")
        print(f"--resume: no {STATE_FILE} in {out}, starting from scratch")
        return 0, 0.0
    st = load_safely(path, gen.device)
    model_fields = {f.name for f in fields(Config) if not f.metadata["runtime"]}
    saved = {**plain(Config()), **st["config"]}  # options added since it was written: their defaults
    diff = {k: (saved.get(k), v) for k, v in plain(cfg).items() if k in model_fields and saved.get(k) != v}
    if diff or st["n"] != n:
        raise UserError(f"{path} belongs to another configuration (saved vs now: "
                        f"{diff or {'N': (st['n'], n)}}). Resume with the same flags, or start a "
                        f"new run with another --out.")
    model.load_state_dict(st["model"]), ema.load_state_dict(st["ema"])
    opt.load_state_dict(st["opt"]), gen.set_state(st["rng"].cpu())
    return st["steps"], st["train_time_s"]


def load_model_file(path, device):
    """(config, EMA denoiser, privacy report, {preset, sampler}) from a releasable model file."""
    if not path:
        raise UserError("--sample-only and --eval-only need --ckpt PATH of a model.pt")
    m = load_safely(Path(path), device)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["config"].items()})
    ema = build_denoiser(cfg).to(device)
    ema.load_state_dict(m["ema"])
    print(f"loaded {path}: trained {m['privacy']['steps']} steps, (eps, delta) = "
          f"({m['privacy']['eps_spent']:.4f}, {cfg.delta})")
    return cfg, ema, m["privacy"], {k: m.get(k) for k in ("preset", "sampler")}


def refuse_to_overwrite(out, args, names):
    """A run never overwrites another's files unless asked (--overwrite, or --resume for the same run)."""
    found = [n for n in names if (out / n).exists()]
    if not found or args.resume and not (args.sample_only or args.eval_only):
        return
    if not args.overwrite:
        raise UserError(f"{out} already holds {', '.join(found)}. Continue that run with --resume, "
                        f"start over with --overwrite, or choose another --out.")
    for name in found:
        (out / name).unlink()


def save_outputs(out, x, y, cfg, sc, report, times, n_train):
    """samples.npz (x uint8, y); grid.png, one labelled row per class (unconditional: the first 100
    images); metrics.json, which keeps the DP release apart from numbers computed on private data
    outside the mechanism."""
    from matplotlib.figure import Figure
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples.npz", x=x, y=y)
    names, cols = CLASS_NAMES.get(cfg.dataset), 10
    rows = ([x[y == c][:cols] for c in range(10)] if names
            else [x[i:i + cols] for i in range(0, min(len(x), 100), cols)])
    rows = [np.concatenate(list(r) + [np.zeros_like(x[0])] * (cols - len(r)), 1) for r in rows if len(r)]
    fig = Figure(figsize=(cols * 0.6 + 0.8, len(rows) * 0.6))
    ax = fig.add_axes([0.12 if names else 0.0, 0, 0.88 if names else 1.0, 1])
    ax.imshow(np.concatenate(rows, 0), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([x.shape[1] * (i + 0.5) for i in range(len(rows))] if names else [])
    ax.set_yticklabels(names[:len(rows)] if names else [], fontsize=8)
    fig.savefig(out / "grid.png", dpi=100)
    metrics = {"dp_release": {**report, "config": plain(cfg)},
               "not_covered_by_dp": {"n_train": n_train, **times}, "sampler": plain(sc)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# ----------------------------------------------------------------------------- progress, Ctrl-C, summary
class Interrupted(Exception):
    def __init__(self, step, total, eps):
        super().__init__(f"interrupted at step {step}")
        self.step, self.total, self.eps = step, total, eps


class StopRequest:
    """Ctrl-C or SIGTERM while training: finish the current step, save it, exit with 130 and say
    how to continue. A second Ctrl-C stops at once (the last checkpoint stays valid)."""
    requested = False

    def __enter__(self):
        try:
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave the handlers alone
            self.old = {}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once) ...", flush=True)

    def requested_on_any_rank(self, device):
        return any_rank(self.requested, device)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def continue_command(argv):
    """The user's own command, with --resume instead of --overwrite (sampling: --overwrite)."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--resume", "--overwrite")]
    again = "--overwrite" if {"--sample-only", "--eval-only"} & set(argv) else "--resume"
    return shlex.join(["python", Path(__file__).name, *map(str, argv), again])


def print_plan(cfg, model, n, q, total_steps, noise_multiplier, step, insecure_seed):
    n_params = sum(p.numel() for p in model.parameters())
    print(f"U-Net: {n_params:,} parameters | N = {n} | q = {q:.5g} (expected batch {q * n:.0f}) | "
          f"{total_steps} steps | K = {cfg.K} | noise multiplier {noise_multiplier:.4f} for (eps = "
          f"{cfg.eps}, delta = {cfg.delta})" + (f" | {world()[1]} processes" if world()[1] > 1 else ""))
    if step:
        print(f"resumed at step {step}: eps spent so far "
              f"{epsilon_rdp(q, noise_multiplier, step, cfg.delta):.4f}"
              + (" (training had finished: sampling again)" if step == total_steps else ""))
    if insecure_seed is not None:
        print("WARNING: --insecure-noise-seed: the DP noise is reproducible by anyone who knows the "
              "seed. Privacy guarantee void: noise seed known (recorded in the outputs).")


def print_progress(line, done, total, elapsed):
    """`line`, then the minutes so far and left at this rate (done, total: counted since the start)."""
    left = elapsed / done * (total - done)
    print(f"{line} | {elapsed / 60:5.1f} min, {left / 60:5.1f} min left", flush=True)


def print_summary(out, args, metrics, wall_s):
    r, t, ev = metrics["dp_release"], metrics["not_covered_by_dp"], metrics.get("evaluation", {})
    minutes = " + ".join(f"{k[:-7]} {t[k] / 60:.1f}" for k in ("train_time_s", "sample_time_s", "eval_time_s")
                         if k in t)
    print(f"\n==== summary: {r['config']['dataset']}, preset {args.preset} ====")
    print(f"(eps, delta) = ({r['eps_spent']:.4f}, {r['delta']}) after {r['steps']}/{r['total_steps']} "
          f"steps | noise multiplier {r['noise_multiplier']:.4f} | q {r['q']:.5g} | "
          f"guarantee: {r['privacy_guarantee']}")
    print(f"wall time {wall_s / 60:.1f} min ({minutes} min)")
    if ev.get("downstream"):
        print("accuracy on the real test set, classifiers trained on samples: " + " | ".join(
            f"{k} {v['test_acc'] * 100:.1f} %" for k, v in ev["downstream"].items()))
    if ev.get("fid") is not None:
        print(f"FID {ev['fid']:.2f} against the {ev['fid_reference']}")
    print("safe to publish: " + ", ".join(str(out / n) for n in (MODEL_FILE, "samples.npz", "grid.png")
                                          if (out / n).exists()))
    print("outside the guarantee (publish with care): metrics.json's not_covered_by_dp and evaluation")
    if not (args.sample_only or args.eval_only):
        print(f"PRIVATE, never share: {out / STATE_FILE} (the noise generator's state; --resume needs it)")


# ----------------------------------------------------------------------------- torchrun
def any_rank(flag, device):
    """DIST: True on every process if it is True on any (so that all stop together)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def world():
    """DIST: (rank, number of processes); (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(args):
    """DIST: under `torchrun --nproc_per_node=N` join the process group (NCCL on GPUs, one GPU
    per process; gloo on CPU) and silence the other ranks' prints. Returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank()


# ----------------------------------------------------------------------------- evaluation (DPDM Sec. 5)
# FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) of Inception-v3 pool features (Heusel et
# al. 2017): the TF graph `inception-2015-12-05` in NVIDIA's TorchScript port (StyleGAN2-ADA
# metrics; DPDM loads a pickle of the same port, which runs code when unpickled). sha256 as
# pinned by crowsonkb/k-diffusion (k_diffusion/evaluation.py).
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                 "metrics/inception-2015-12-05.pt")
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpdm"


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2) in float64 without scipy, with
    tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}: both matrices are symmetric PSD (eigh)."""
    mu1, s1, mu2, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64)
                        for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def load_inception(cache_dir=None, device="cpu", url=None, sha256=None):
    """Download once to `cache_dir`, check the sha256 of the bytes, and only then load them."""
    url, sha256 = url or INCEPTION_URL, sha256 or INCEPTION_SHA256
    path = Path(cache_dir or INCEPTION_CACHE) / "inception-2015-12-05.pt"
    how = (f"FID needs the Inception-v3 network file (95.6 MB): download\n  {url}\non a machine "
           f"with internet and save it as\n  {path}\n(its sha256 must be {sha256}).")
    if not path.exists():
        print(f"downloading {url} -> {path}")
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as err:  # URLError, timeout, no network
            raise RuntimeError(f"could not download the FID network ({err}).\n{how}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"the download from {url} has the wrong sha256; refusing it.\n{how}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".part").write_bytes(data)
        path.with_suffix(".part").replace(path)  # atomic: a killed download leaves no bad file
    data = path.read_bytes()
    if (digest := hashlib.sha256(data).hexdigest()) != sha256:
        raise RuntimeError(f"{path} has sha256 {digest}, not the pinned {sha256}: refusing to load "
                           f"it (corrupt or tampered with?). Delete it to download it again.\n{how}")
    return torch.jit.load(io.BytesIO(data), map_location=device).eval()


@torch.no_grad()
def inception_features(detector, images, batch_size=250, device="cpu"):
    """2048-d pool features of uint8 images (N, C, H, W) or (N, H, W); grayscale is repeated
    to 3 channels exactly as DPDM's get_activations does (no other preprocessing)."""
    x = torch.as_tensor(np.asarray(images))
    x = x[:, None] if x.ndim == 3 else x
    if x.dtype != torch.uint8 or x.shape[1] not in (1, 3):
        raise ValueError(f"FID expects uint8 images (N, 1|3, H, W); got {x.dtype} {tuple(x.shape)}")
    feats = [detector(b.to(device).repeat(1, 3 // b.shape[1], 1, 1), return_features=True).double().cpu()
             for b in x.split(batch_size)]
    return torch.cat(feats).numpy()


def feature_stats(images, detector=None, **kw):
    feats = inception_features(load_inception() if detector is None else detector, images, **kw)
    return feats.mean(0), np.cov(feats, rowvar=False)


def reference_stats(real_images, cache_file, detector=None, **kw):
    """mu, sigma of a real image set, computed once and cached as .npz."""
    cache_file = Path(cache_file)
    if cache_file.exists():
        s = np.load(cache_file)
        if str(s["detector_sha256"]) == INCEPTION_SHA256 and int(s["n"]) == len(real_images):
            return s["mu"], s["sigma"]
    mu, sigma = feature_stats(real_images, detector, **kw)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_file, mu=mu, sigma=sigma, n=len(real_images), detector_sha256=INCEPTION_SHA256)
    return mu, sigma


def compute_fid(samples_uint8, ref_stats, detector=None, **kw):
    return frechet_distance(*feature_stats(samples_uint8, detector, **kw), *ref_stats)


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


def train_classifier(arch, x_train, y_train, x_val, y_val, epochs, batch_size=128, lr=3e-4, seed=0):
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


def evaluate_downstream(train_xy, val_xy, test_xy, epochs, archs=CLASSIFIERS, seed=0, **train_kw):
    """Real-test-set accuracy of each classifier trained on generated samples, at the epoch chosen
    on other generated samples (the test set is read once, afterwards). epochs: int or {arch: int}."""
    results = {}
    for arch in archs:
        t0, n = time.time(), epochs[arch] if isinstance(epochs, dict) else epochs
        model, sel = train_classifier(arch, *train_xy, *val_xy, n, seed=seed, **train_kw)
        results[arch] = dict(test_acc=accuracy(model, *test_xy), best_epoch=sel["epoch"],
                             val_acc=sel["val_acc"], epochs=n, seconds=round(time.time() - t0, 1))
        print(f"  {arch:6s}: test accuracy {results[arch]['test_acc'] * 100:.1f} % (epoch {sel['epoch']}/{n} "
              f"chosen on generated data, {time.time() - t0:.0f} s)", flush=True)
    return results


def evaluate(ema, x, y, data, cfg, sc, args):
    """The paper's yardsticks for samples (x, y): classifiers (epoch chosen on a second generated
    set, or on a held-out tenth of this one) and, with --fid, FID against the training set (as
    DPDM) or the test set. Both read data outside the DP mechanism: the results are labelled."""
    preset, ev = PRESETS[args.preset], {"sampler": plain(sc)}
    if data["test"] is not None:
        epochs = args.eval_epochs or preset.eval_epochs
        if preset.val_samples:
            print(f"sampling a second set of {preset.val_samples} images to choose the epochs ...")
            val = generate(ema, sc, preset.val_samples, args.device, cfg.seed + 1)
            train_xy, how = (x, y), f"a second generated set of {preset.val_samples}"
        else:
            *train_xy, vx, vy = split_generated(x, y, seed=cfg.seed)
            val, how = (vx, vy), "a held-out tenth of the samples"
        print(f"classifiers on {len(train_xy[0])} samples, epochs {epochs}, chosen on {how} ...")
        ev["downstream"] = evaluate_downstream(train_xy, val, data["test"], epochs, seed=cfg.seed)
        ev["downstream_protocol"] = f"trained on {len(train_xy[0])} samples; epoch chosen on {how}"
    elif not args.fid:
        print("no labels (CelebA), hence no classifiers: add --fid for its FID")
    if not args.fid:
        return ev
    if data[args.fid_ref] is None:
        raise UserError(f"{cfg.dataset} has no {args.fid_ref} split: use --fid-ref train")
    try:
        detector = load_inception(device=args.device)
        real = ((data[args.fid_ref][0] + 1) * 127.5).round().to(torch.uint8).numpy()
        ref = reference_stats(real, INCEPTION_CACHE / f"{cfg.dataset}_{args.fid_ref}_inception.npz",
                              detector, device=args.device)
        ev["fid"] = compute_fid(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2), ref,
                                detector, device=args.device)
    except RuntimeError as err:  # offline: keep the accuracies, say why FID is missing
        print(f"FID skipped: {err}")
        ev["fid"], ev["fid_error"] = None, str(err)
    ev["fid_reference"] = ("training set (private data, outside the DP guarantee)"
                           if args.fid_ref == "train" else "test set")
    return ev


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda message: p.exit(  # one line that says what to do, not the whole usage block
        2, f"error: {message}. See: python {Path(__file__).name} --help\n")
    p.add_argument("--preset", choices=list(PRESETS), type=str.lower,
                   help="default: gpu on CUDA, else cpu (see PRESETS in the code and the README)")
    p.add_argument("--out", help="output folder; default out/04_dpdm_mnist, or with --sample-only "
                                 "/ --eval-only the folder 'resampled' beside --ckpt")
    p.add_argument("--data-dir", help="folder with the four IDX files (.gz or raw); CelebA: its zip")
    p.add_argument("--unverified", action="store_true",
                   help="accept IDX files that do not match the published checksums (your own data)")
    p.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {STATE_FILE}")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    p.add_argument("--sample-only", action="store_true", help="only sample from --ckpt")
    p.add_argument("--eval-only", action="store_true", help="sample from --ckpt and evaluate")
    p.add_argument("--ckpt", help=f"the {MODEL_FILE} for --sample-only / --eval-only")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=None,
                   help="classifiers (and FID with --fid) after sampling; default on, except smoke")
    p.add_argument("--fid", action="store_true", help="also FID (downloads Inception once; GPU advised)")
    p.add_argument("--fid-ref", choices=("train", "test"), default="train",
                   help="FID against the training set (DPDM; private data) or the test set")
    p.add_argument("--eval-epochs", type=int, help="classifier epochs (default: the preset's)")
    p.add_argument("--sampler-setting", choices=("fid", "acc"),
                   help="the paper's sampler setting for the run's dataset and eps (Table 1's rows)")
    p.add_argument("--insecure-noise-seed", type=int,
                   help="reproducible DP noise for tests and debugging: VOIDS the privacy guarantee")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is often fastest on a busy CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in fields(Config) + fields(SamplerConfig):  # every field is a flag: --batch 512 --mults 1,2
        kind = str.lower if f.type is str else f.type
        if f.type is tuple:  # "1,2,2" -> (1, 2, 2)
            kind = lambda s: tuple(int(v) for v in s.split(","))
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=f.metadata["help"],
                       choices=f.metadata.get("choices"), metavar=f.name.upper(), type=kind)
    args = p.parse_args(argv)
    from_model = args.sample_only or args.eval_only
    args.preset = args.preset or (None if from_model else "gpu" if args.device.startswith("cuda") else "cpu")
    args.eval = (not args.sample_only and args.preset != "smoke") if args.eval is None else args.eval
    args.eval = args.eval or args.eval_only
    args.out = args.out or (str(Path(args.ckpt or ".").parent / "resampled") if from_model
                            else "out/04_dpdm_mnist")
    given = {f.name: v for f in fields(Config) if (v := getattr(args, f.name)) is not None}
    per_dataset = DATASETS[given.get("dataset", "mnist")].paper if args.preset in ("paper", "gpu") else {}
    cfg = Config(**{**PRESETS[args.preset or "cpu"].train, **per_dataset, **given})
    for name, ok in (("clip", math.isfinite(cfg.clip) and cfg.clip > 0), ("batch", cfg.batch > 0),
                     ("K", cfg.K > 0), ("epochs", math.isfinite(cfg.epochs) and cfg.epochs > 0),
                     ("lr", math.isfinite(cfg.lr) and cfg.lr > 0), ("chunk", cfg.chunk > 0)):
        if not ok:  # values no run can use: one line each, before anything starts
            p.error(f"--{name} must be a finite number > 0 (got {getattr(cfg, name)})")
    return args, cfg, None if from_model else sampler_config(args, cfg)


def sampler_config(args, cfg, saved=None):
    """The preset's sampler (from a model file: the one its run used) or the paper's named
    setting for cfg's dataset and eps, then the sampler flags."""
    preset = PRESETS[args.preset]
    named = preset.sampler if isinstance(preset.sampler, str) else None  # CelebA has none:
    setting = args.sampler_setting or (named if not saved and cfg.dataset in CLASS_NAMES else None)
    base = saved or ({} if named else preset.sampler)  # then DPDM's default, DDIM with 50 steps
    if setting:
        base, note = paper_sampler(cfg.dataset, cfg.eps, setting)
        print(f"sampler: the paper's '{setting}' setting for {cfg.dataset}{note}")
    given = {f.name: v for f in fields(SamplerConfig) if (v := getattr(args, f.name)) is not None}
    extra = {"num_samples": 60_000} if args.preset == "paper" and not saved else {}
    return SamplerConfig(**{**base, **extra, **given})


if __name__ == "__main__":
    main()
