"""Chapter 04 - Differentially Private Diffusion Models on MNIST, end to end.

`python 04_dpdm_mnist.py --eps 10` trains a class-conditional diffusion model with DP-SGD
at (eps, delta=1e-5) and writes samples. Everything chapters 01-03 built is re-expressed
here compactly, so this file runs alone.

What you learn (Dockhorn, Cao, Vahdat, Kreis, "Differentially Private Diffusion Models",
TMLR 2023 - "DPDM"; Karras et al. 2022 - "EDM"):
  * The denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM preconditioning
    (EDM Table 1) and loss  E_sigma,n  lambda(sigma) |D(y + sigma n; sigma) - y|^2,
    ln sigma ~ N(-1.2, 1.2^2), lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
  * Noise multiplicity (DPDM Sec. 3.2): each example's loss averages K noise draws. The
    example is still ONE example for DP-SGD, so K lowers gradient variance at no privacy cost.
  * DP-SGD (Abadi et al. 2016; DPDM Alg. 1): Poisson sampling with rate q, per-example
    gradients (torch.func), clipping to norm C, Gaussian noise N(0, sigma_dp^2 C^2 I) once per
    logical batch, divide by the expected batch size qN.
  * The RDP accountant of the Poisson-subsampled Gaussian (Mironov et al. 2019) and the
    RDP -> (eps, delta) conversion of Balle et al. 2020; sigma_dp is calibrated so that the
    final eps never exceeds the target.
  * EDM's stochastic sampler with "churn" (EDM Alg. 2), deterministic Heun/DDIM, and
    classifier-free guidance D = (1 + w) D(x|y) - w D(x|null) (DPDM App. C).
  * The v-prediction parameterisation DPDM uses at eps = 0.2 (DPDM Sec. 5.2 ablation).
  * Evaluation as in DPDM Sec. 5: FID, and classifiers trained on samples, tested on real data.
  * Data parallelism that keeps the guarantee: `torchrun --nproc_per_node=N` splits each
    logical batch's per-example gradients across processes (places marked "DIST").
Presets: `paper` (DPDM's config), `gpu` (about an hour on one GPU), `cpu` (<= 15 min on 2
cores), `smoke` (seconds; tests). Datasets: mnist, fmnist, celeba (32x32, unconditional).
"""
import argparse
import copy
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass, asdict, fields
from pathlib import Path, PurePath

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call, grad_and_value, vmap


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # data
    dataset: str = "mnist"          # mnist | fmnist | celeba (32x32, unconditional)
    # model: DDPM++ U-Net (DPDM App. B)
    channels: int = 32              # base channels
    mults: tuple = (1, 2, 2)        # channel multiplier per resolution level
    blocks: int = 2                 # residual blocks per level
    attn: tuple = (7,)              # resolutions with self-attention
    unshuffle: int = 1              # 2: run the U-Net on 14x14x4 pixel-unshuffled images
    # objective
    param: str = "auto"             # edm | v | auto: v if eps < 1 else edm, as DPDM (v at 0.2)
    p_mean: float = -1.2            # EDM: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    logsnr_min: float = -9.0        # v: log-SNR range of the cosine schedule (DPDM config)
    logsnr_max: float = 13.0
    K: int = 32                     # noise multiplicity
    label_dropout: float = 0.1      # classifier-free guidance training
    # DP-SGD
    eps: float = 10.0
    delta: float = None             # default: 1e-5, CelebA 1e-6 (DPDM; must be < 1/N)
    batch: int = 4096               # q = 1 / ceil(N / batch), as Opacus' DPDataLoader
    epochs: float = 300.0           # steps = epochs * ceil(N / batch)
    clip: float = 1.0
    lr: float = 3e-4
    ema: float = 0.999
    seed: int = 0
    # sampling (not part of the trained model's identity)
    sampler: str = "churn"          # churn | heun | ddim (= Euler on the probability-flow ODE)
    sample_steps: int = 50
    s_churn: float = 10.0
    s_min: float = 0.05
    s_max: float = 50.0
    s_noise: float = 1.0
    guidance: float = 0.0           # classifier-free guidance scale w
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_samples: int = 10000
    # run-time knobs (do not change what is computed)
    chunk: int = 16                 # physical batch: examples per vmap call. Memory grows
                                    # with chunk * K: 16 GB at 16 x 32 (paper U-Net, fp32)
    ckpt_every: int = 100           # steps between checkpoints
    log_every: int = 10

    def __post_init__(self):  # DPDM: EDM at eps = 10 and 1, v-prediction at eps = 0.2
        if self.param == "auto":
            self.param = "v" if self.eps < 1 else "edm"
        if self.delta is None:
            self.delta = 1e-6 if self.dataset == "celeba" else 1e-5


# dataset: (image channels, resolution, classes, DPDM's config where it differs from MNIST's)
DATASETS = {"mnist": (1, 28, 10, {}), "fmnist": (1, 28, 10, {}),
            "celeba": (3, 32, 0, dict(batch=2048, attn=(16, 8)))}  # q = 1/80, 24,000 steps


PRESETS = {
    # DPDM's released MNIST config: 1.75M-parameter DDPM++, batch 4096 with q = 1/15
    # (expected batch 4000), 300 epochs = 4500 steps, K = 32, sigma_dp = 2.487 at eps = 10.
    "paper": dict(),
    # One modern GPU, about an hour (an estimate, not measured): paper model and batch,
    # K = 4 and 60 epochs (900 steps) cut the compute 40x; sigma_dp = 1.29 at eps = 10.
    "gpu": dict(K=4, epochs=60.0, chunk=128, ckpt_every=100),
    # <= 15 min on one CPU core (measured 13 min; CNN 84-87 % at eps = 10). What limits is
    # the budget of ~500k per-example gradients, not the DP noise (sigma_dp = 0.61). So: a
    # 48k-parameter U-Net on 14x14x4 pixel-unshuffled images, B = 1000 for 510 steps (B =
    # 3000 for 60 steps gave 20 %), a high lr, and P_mean = 0 (P_mean -0.5: 79 %, 0: 85 %).
    "cpu": dict(channels=8, mults=(1, 2), blocks=1, attn=(7,), unshuffle=2, K=1, batch=1000,
                epochs=8.5, lr=3e-3, p_mean=0.0, sampler="heun", sample_steps=10,
                guidance=1.0, chunk=250, ckpt_every=50, log_every=10),
    # seconds, for the tests
    "smoke": dict(channels=8, mults=(1, 2), blocks=1, attn=(7,), unshuffle=2, K=2,
                  batch=32, epochs=2.0, lr=1e-3, sample_steps=4, num_samples=20,
                  chunk=16, ckpt_every=2, log_every=1),
}
EXPECTED_TIME = {"paper": "~50 A100-hours (third-party rerun: 13 h on 4x A100); ~1 h per step "
                          "on one CPU core (measured), i.e. ~200 days",
                 "gpu": "~1 h on one modern GPU (an estimate, not measured)",
                 "cpu": "~13 min on one CPU core: training 10, 10k samples 2, evaluation 1",
                 "smoke": "seconds"}
RUNTIME = {"chunk", "ckpt_every", "log_every", "num_samples", "sampler", "sample_steps",
           "s_churn", "s_min", "s_max", "s_noise", "guidance", "sigma_min", "sigma_max", "rho"}

# The paper's two sampler settings (Config fields; sources in nv-tlabs/DPDM):
# "fid": the churn setting its README gives for the best FID (quoted for MNIST eps = 1; the
#        eps = 10 rows of the paper's Tables 13-14 were not reachable offline).
# "acc": configs/mnist_28/sample_eps_10.0.yaml: deterministic DDIM, 50 steps, no guidance
#        (the paper's eps = 10 ablation: DDIM CNN 97.7 % vs 98.1 % for its tuned churn).
SAMPLER_SETTINGS = {
    "fid": dict(sampler="churn", sample_steps=1000, s_churn=100.0, s_min=0.05, s_max=50.0,
                s_noise=1.0, guidance=0.0, sigma_min=0.002, sigma_max=80.0, rho=7.0),
    "acc": dict(sampler="ddim", sample_steps=50, guidance=0.0, sigma_min=0.002,
                sigma_max=80.0, rho=7.0),
}


class UserError(ValueError):
    """Bad input: the message says what to do. main() prints it and exits."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), help="default: gpu on CUDA, else cpu")
    p.add_argument("--out", help="output folder; default out/04_dpdm_mnist, or with --sample-only "
                                 "/ --eval-only the folder 'resampled' beside --ckpt")
    p.add_argument("--data-dir", help="folder with the four IDX files (.gz or raw), offline")
    p.add_argument("--unverified", action="store_true",
                   help="accept IDX files in --data-dir that do not match the published "
                        "checksums (your own data in MNIST format); structure is still checked")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--sample-only", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt", help="checkpoint for --sample-only / --eval-only")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=None,
                   help="downstream accuracy (and FID with --fid) after sampling; default: on, "
                        "except for the smoke preset")
    p.add_argument("--eval-only", action="store_true", help="sample from --ckpt and evaluate")
    p.add_argument("--fid", action="store_true",
                   help="also compute FID (downloads the Inception network once; GPU advised)")
    p.add_argument("--eval-epochs", type=int, help="classifier epochs (default: preset's)")
    p.add_argument("--sampler-setting", choices=sorted(SAMPLER_SETTINGS),
                   help="the paper's named eps=10 sampler settings (override --sampler etc.)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in fields(Config):  # every Config field can be overridden: --batch 512 --mults 1,2
        kind = int if f.type is tuple else f.type
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       type=(lambda s, k=kind: tuple(k(v) for v in s.split(",")))
                       if f.type is tuple else f.type)
    args = p.parse_args(argv)
    args.preset = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    if args.eval is None:  # evaluate after training by default, except in the smoke preset
        args.eval = not args.sample_only and args.preset != "smoke"
    args.eval = args.eval or args.eval_only
    from_ckpt = args.sample_only or args.eval_only  # never overwrite the training run's outputs
    args.out = args.out or (str(Path(args.ckpt or ".").parent / "resampled") if from_ckpt
                            else "out/04_dpdm_mnist")
    overrides = {f.name: getattr(args, f.name) for f in fields(Config)
                 if getattr(args, f.name) is not None}
    dataset = overrides.get("dataset", PRESETS[args.preset].get("dataset", "mnist"))
    if dataset not in DATASETS:
        p.error(f"--dataset must be one of {', '.join(DATASETS)}")
    # the paper and gpu presets follow DPDM's config of each dataset; cpu and smoke are budgets
    per_dataset = DATASETS[dataset][3] if args.preset in ("paper", "gpu") else {}
    return args, Config(**{**PRESETS[args.preset], **per_dataset, **overrides})


# ----------------------------------------------------------------------------- data
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MIRRORS = {"mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                     "https://storage.googleapis.com/cvdf-datasets/mnist/",
                     "http://yann.lecun.com/exdb/mnist/"],
           "fmnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
                      "master/data/fashion/"]}
# MNIST: sha256 of the decompressed files (any gzip of them passes). Fashion-MNIST: md5 of
# the official .gz files (as published by Zalando and used by torchvision).
CHECKSUMS = {"mnist": {n: ("sha256-raw", h) for n, h in zip(IDX_FILES, (
                 "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                 "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                 "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                 "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"))},
             "fmnist": {n: ("md5-gz", h) for n, h in zip(IDX_FILES, (
                 "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                 "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))}}


def parse_idx(raw, name):
    """IDX: magic 0x0000 <dtype 0x08=uint8> <ndim>, ndim big-endian uint32 sizes, data."""
    if len(raw) < 8 or raw[:3] != b"\x00\x00\x08" or raw[3] not in (1, 3):
        raise UserError(f"{name}: not an IDX uint8 file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and dims[1:] != [28, 28] or len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise UserError(f"{name}: corrupt IDX file (dims {dims}, {len(raw)} bytes)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def check_idx_file(data, dataset, name, unverified=False):
    """Decompress if gzipped, verify the published checksum, parse the IDX structure."""
    raw = data
    if data[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise UserError(f"{name}: corrupt gzip file ({e}); delete it and fetch it again")
    kind, want = CHECKSUMS[dataset][name]
    got = (hashlib.sha256(raw) if kind == "sha256-raw" else hashlib.md5(data)).hexdigest()
    if got != want and not unverified:
        raise UserError(f"{name}: checksum mismatch ({kind} {got} != {want}): the file is "
                        f"corrupt or not {dataset}. Delete it and fetch it again, or pass "
                        f"--unverified to use it anyway (its IDX structure is checked).")
    return parse_idx(raw, name)


def download(dataset, name, cache, mirrors=None):
    """Try each mirror; cache the first copy whose checksum verifies (atomic write)."""
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


def center_crop_resize(img, resolution=32):
    """Centre square crop, then Lanczos resize: StyleGAN's dataset_tool --transform=center-crop,
    which DPDM's data preparation uses."""
    a = np.asarray(img.convert("RGB"))
    c = min(a.shape[:2])
    top, left = (a.shape[0] - c) // 2, (a.shape[1] - c) // 2
    crop = Image.fromarray(a[top:top + c, left:left + c])
    return np.asarray(crop.resize((resolution, resolution), Image.LANCZOS))


def load_celeba(path, resolution=32):
    """uint8 (N, 3, res, res) of the official training split (files 000001-162770.jpg, the
    partition 0 of list_eval_partition.txt) from img_align_celeba.zip or its folder."""
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
        img = Image.open(io.BytesIO(read(names[name])))
        out[i] = center_crop_resize(img, resolution).transpose(2, 0, 1)
        if (i + 1) % 20_000 == 0:
            print(f"  CelebA: {i + 1}/{len(keep)} images")
    return out


def load_data(dataset, data_dir=None, unverified=False):
    """{"train": (x, y), "test": (x, y)}: x float32 [n,C,H,W] scaled to [-1,1], y int64
    (CelebA: y and "test" are None). Reads --data-dir, else the cache ./data/<dataset>,
    downloading what is missing (MNIST and Fashion-MNIST; CelebA must be fetched by hand)."""
    folder = Path(data_dir) if data_dir else Path(__file__).resolve().parent / "data" / dataset
    if dataset == "celeba":
        return {"train": (torch.from_numpy(load_celeba(folder)) / 127.5 - 1.0, None), "test": None}
    help_ = (f"the four files {', '.join(IDX_FILES)} (.gz or raw) are at {MIRRORS[dataset][0]}; "
             f"offline, put them in a folder and pass --data-dir")
    arrays = []
    for name in IDX_FILES:
        path = next((folder / f for f in (name + ".gz", name) if (folder / f).exists()), None)
        if path is None and data_dir:
            raise UserError(f"missing {name}(.gz) in {folder}: {help_}")
        try:
            data = path.read_bytes() if path else download(dataset, name, folder)
        except UserError as e:
            raise UserError(f"{e}\n{help_}")
        arrays.append(check_idx_file(data, dataset, name, unverified and path is not None))
    out = {}
    for split, (xi, yi) in (("train", arrays[:2]), ("test", arrays[2:])):
        if len(xi) != len(yi):
            raise UserError(f"{split}: {len(xi)} images but {len(yi)} labels; {help_}")
        x = torch.from_numpy(xi.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
        out[split] = (x, torch.from_numpy(yi.astype(np.int64)))
    return out


# ----------------------------------------------------------------------------- model
def noise_embedding(c_noise, dim):
    """Sinusoidal embedding of the (scalar) noise level, as DDPM++'s positional embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=c_noise.device) / (half - 1))
    angles = c_noise.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(c):
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)  # GroupNorm, never BatchNorm: BN mixes
                                                       # examples, which breaks per-example DP


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
    """DDPM++ U-Net F(x, c_noise, y). With unshuffle=r it runs on (H/r)x(W/r)x(r^2 C) images."""
    def __init__(self, img_channels=1, res=28, channels=32, mults=(1, 2, 2), blocks=2,
                 attn=(7,), n_classes=10, unshuffle=1):
        super().__init__()
        self.unshuffle, self.channels, self.n_classes = unshuffle, channels, n_classes
        self.img_shape = (img_channels, res, res)
        cin, res, emb = img_channels * unshuffle ** 2, res // unshuffle, 4 * channels
        # class embedding with one extra "null" label (index n_classes) for CFG
        self.label = nn.Embedding(n_classes + 1, channels) if n_classes else None
        self.map = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
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

    def forward(self, x, c_noise, y=None):
        emb = noise_embedding(c_noise, self.channels)
        if self.label is not None:
            emb = emb + self.label(y)
        emb = self.map(emb)
        x = F.pixel_unshuffle(x, self.unshuffle)
        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(block(hs[-1], emb))
        h = hs[-1]
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(h, emb) if block.resample == "up" else block(torch.cat([h, hs.pop()], 1), emb)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.unshuffle)


def build_model(cfg):
    img_channels, res, n_classes, _ = DATASETS[cfg.dataset]
    return UNet(img_channels, res, cfg.channels, cfg.mults, cfg.blocks, cfg.attn, n_classes,
                cfg.unshuffle)


# ----------------------------------------------------------------------------- objective
SIGMA_DATA = math.sqrt(1 / 3)  # std of data uniform on [-1, 1], DPDM's choice


def denoise(net, x, sigma, y, param):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise). sigma broadcasts as [b,1,1,1].
    edm: EDM Table 1 with sigma_data; v: the same with sigma_data = 1 and c_noise = t, the
    cosine-schedule time with sigma = tan(pi t / 2) (v-prediction, Salimans & Ho 2022)."""
    sd = SIGMA_DATA if param == "edm" else 1.0
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
    c_noise = sigma.log() / 4 if param == "edm" else torch.atan(sigma) * 2 / math.pi
    return c_skip * x + c_out * net(c_in * x, c_noise.flatten(), y).float()


def sample_sigma(shape, cfg, gen):
    """Training noise levels. edm: ln sigma ~ N(P_mean, P_std^2). v: t ~ U over the cosine
    schedule's log-SNR range [logsnr_min, logsnr_max], sigma = tan(pi t / 2) - this puts more
    weight on high noise levels, which DPDM found crucial at strong privacy."""
    dev = gen.device
    if cfg.param == "edm":
        return (cfg.p_mean + cfg.p_std * torch.randn(shape, generator=gen, device=dev)).exp()
    t_lo, t_hi = (2 / math.pi * math.atan(math.exp(-s / 2)) for s in (cfg.logsnr_max, cfg.logsnr_min))
    t = t_lo + (t_hi - t_lo) * torch.rand(shape, generator=gen, device=dev)
    return torch.tan(math.pi * t / 2)


def loss_weight(sigma, param):
    sd = SIGMA_DATA if param == "edm" else 1.0
    return (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2


def diffusion_loss(net, x, y, sigma, noise, param):
    """Per-example loss with noise multiplicity: x [b,C,H,W], y [b], sigma [b,K],
    noise [b,K,C,H,W] -> [b], each the mean over its K noise draws and all pixels."""
    b, K = sigma.shape
    xk = x[:, None].expand(b, K, *x.shape[1:]).reshape(b * K, *x.shape[1:])
    s = sigma.reshape(b * K, 1, 1, 1)
    yk = None if y is None else y.repeat_interleave(K)
    D = denoise(net, xk + s * noise.reshape(xk.shape), s, yk, param)
    return (loss_weight(s, param) * (D - xk) ** 2).reshape(b, -1).mean(1)


# ----------------------------------------------------------------------------- accountant
RDP_ORDERS = np.concatenate([np.arange(1.25, 12, 0.25), np.arange(12, 257)])


def rdp_subsampled_gaussian(q, sigma, orders=RDP_ORDERS):
    """RDP of one step of the Poisson-subsampled Gaussian mechanism (sensitivity 1, noise
    sigma), at real orders a > 1 (Mironov, Talwar, Zhang 2019, Sec. 3.3):
        eps(a) = log A_a / (a - 1),  A_a = E_{z ~ N(0, sigma^2)} [ (1 - q + q e^{(2z-1)/(2 sigma^2)})^a ],
    the a-th moment of the likelihood ratio between "with" and "without" one example. We
    integrate it on a grid, entirely in log space (A_a reaches e^1000s for large a): the
    integrand is smooth with mass near z = 0 and z = a, and the trapezoid rule on such a
    function is accurate far beyond float64 with step sigma/20."""
    h = sigma / 20
    z = np.arange(-12 * sigma, orders.max() + 12 * sigma, h)
    log_phi = -z ** 2 / (2 * sigma ** 2) - math.log(sigma * math.sqrt(2 * math.pi)) + math.log(h)
    with np.errstate(divide="ignore"):
        log_ratio = np.logaddexp(np.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma ** 2))
    log_f = log_phi[None] + orders[:, None] * log_ratio[None]
    m = log_f.max(1)
    return (m + np.log(np.exp(log_f - m[:, None]).sum(1))) / (orders - 1)


def epsilon(q, sigma, steps, delta, orders=RDP_ORDERS):
    """(eps, delta)-DP after `steps` compositions; RDP -> DP by Balle et al. 2020, Thm. 21:
    eps = rdp(a) + log((a-1)/a) - (log delta + log a) / (a - 1), minimised over a."""
    if steps == 0:
        return 0.0
    rdp, a = steps * rdp_subsampled_gaussian(q, sigma, orders), orders
    return float(np.min(rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)))


def calibrate_sigma(eps, q, steps, delta):
    """Smallest noise multiplier (to 1e-4 relative) with epsilon(...) <= eps: bisection that
    always returns the upper end, so the target is never exceeded."""
    lo, hi = 0.05, 1.0
    while epsilon(q, hi, steps, delta) > eps:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise UserError(f"eps = {eps} is out of reach even with enormous noise")
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if epsilon(q, mid, steps, delta) <= eps else (mid, hi)
    return hi


def privacy_plan(cfg, n):
    """q, total steps, noise multiplier sigma_dp; validates eps and delta."""
    if not cfg.eps > 0:
        raise UserError(f"--eps must be > 0 (got {cfg.eps}); DPDM uses 0.2, 1 or 10")
    if not 0 < cfg.delta < 1 / n:
        raise UserError(f"--delta must be in (0, 1/N) = (0, {1 / n:.3g}) for N = {n} training "
                        f"examples (got {cfg.delta}); the usual choice is 1e-5 for MNIST")
    batches = math.ceil(n / cfg.batch)
    q, steps = 1 / batches, max(1, round(cfg.epochs * batches))
    return q, steps, calibrate_sigma(cfg.eps, q, steps, cfg.delta)


# ----------------------------------------------------------------------------- DP-SGD
def world():
    """DIST: (rank, number of processes); (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def poisson_batch(n, q, gen):
    """Each example joins the logical batch independently with probability q (the sampling
    the accountant assumes; a shuffled fixed-size batch would not match it)."""
    return torch.nonzero(torch.rand(n, generator=gen, device=gen.device) < q).flatten()


def clip_per_example(grads, clip):
    """sum_i g_i min(1, C / ||g_i||): every example's flat gradient (all parameters
    together) scaled to norm <= C, then summed; one einsum, no scaled copies. fp32."""
    norms = torch.sqrt(sum(g.float().flatten(1).pow(2).sum(1) for g in grads.values()))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factor, g.float()) for k, g in grads.items()}, norms, factor


def clipped_grad_sum(model, x, y, cfg, gen, n_classes, record=False):
    """Sum over the logical batch of clipped per-example gradients. The batch's randomness
    (label dropout, noise levels, noise) is drawn first, then the gradients are computed in
    physical chunks of cfg.chunk examples so memory stays bounded: the chunk size changes
    the speed, not the result. DIST: each of the processes computes one contiguous share
    of the batch and the partial sums are added up (all-reduce); all of them draw all of the
    randomness, so their generators stay identical (same next batch, same DP noise)."""
    rank, size = world()
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda   # fast net on GPU; the
           else torch.autocast("cpu", enabled=False))                  # DP maths stays fp32

    def loss_one(p, xi, yi, si, ni):  # one example: the unit DP protects
        net = lambda *a: functional_call(model, p, a)
        yi = None if yi is None else yi[None]
        return diffusion_loss(net, xi[None], yi, si[None], ni[None], cfg.param)[0]

    per_example_grads = vmap(grad_and_value(loss_one),
                             in_dims=(None, 0, None if y is None else 0, 0, 0))
    b, dev = len(x), gen.device
    if y is not None:  # label dropout (CFG): the whole example becomes unconditional
        y = torch.where(torch.rand(b, generator=gen, device=dev) < cfg.label_dropout, n_classes, y)
    sigma = sample_sigma((b, cfg.K), cfg, gen)
    noise = torch.randn((b, cfg.K, *x.shape[1:]), generator=gen, device=dev)
    share = -(-b // size)  # DIST: ceil(b / size) examples per process
    first, last = rank * share, min(b, (rank + 1) * share)
    stats = {"loss": 0.0, "n": b, "norms": [], "clipped_norms": []}
    for i in range(first, last, cfg.chunk):
        c = slice(i, min(i + cfg.chunk, last))
        yc = None if y is None else y[c]
        with amp:
            grads, losses = per_example_grads(params, x[c], yc, sigma[c], noise[c])
        clipped_sum, norms, factor = clip_per_example(grads, cfg.clip)
        for k in total:
            total[k] += clipped_sum[k]
        stats["loss"] += losses.float().sum().item()
        stats["norms"].append(norms)
        if record:  # measure the clipped gradients themselves, not the formula
            stats["clipped_norms"].append(torch.sqrt(sum(
                (factor.view(-1, *[1] * (g.dim() - 1)) * g).flatten(1).pow(2).sum(1)
                for g in grads.values())))
    stats = {k: torch.cat(v) if isinstance(v, list) and v else v for k, v in stats.items()}
    if size > 1:  # DIST: every process now holds the clipped sum of the whole logical batch
        loss = torch.tensor(stats["loss"], device=x.device)
        for t in [*total.values(), loss]:
            dist.all_reduce(t)
        stats["loss"] = loss.item()
    stats["loss"] /= max(b, 1)
    return total, stats


def dp_step(model, opt, x, y, cfg, noise_multiplier, expected_batch, gen, n_classes=10,
            record=False):
    """One DP-SGD step (DPDM Alg. 1): g = (sum_i clip(g_i) + N(0, sigma_dp^2 C^2 I)) / (qN).
    Dividing by the *expected* batch size qN (not the realised one) keeps the sensitivity
    of the released g at C/(qN) whatever the batch happens to be. Returns statistics with
    the clipped sum and the noise (tests check both); record=True also measures the norm of
    every clipped per-example gradient."""
    total, stats = clipped_grad_sum(model, x, y, cfg, gen, n_classes, record)
    stats["clipped_sum"], stats["noise"] = total, {}
    for k, p in model.named_parameters():
        # Gaussian mechanism: noise std sigma_dp * C, once per logical batch, fp32.
        # (torch's generator is not cryptographically secure; fine for a tutorial.)
        # DIST: all ranks hold the same sum and the same generator state, so they draw the
        # same z and take the same step: one noisy gradient is released, as in one process.
        z = noise_multiplier * cfg.clip * torch.randn(p.shape, generator=gen, device=gen.device)
        p.grad = ((total[k] + z) / expected_batch).to(p.dtype)
        stats["noise"][k] = z
    opt.step()
    return stats


@torch.no_grad()
def ema_update(ema, model, step, max_decay):
    """EMA of the weights with warm-up decay min(ema, (1+n)/(10+n)) (DPDM config). The EMA
    is post-processing of the private weights: it costs no privacy."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------- training
def save_checkpoint(path, state):
    """Write to a temp file, then os.replace: a kill -9 mid-write leaves the old one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    """A checkpoint of this script (it holds our own pickled objects: load only your own)."""
    ck = torch.load(path, map_location=device, weights_only=False)
    if "summary" not in ck:
        raise UserError(f"{path} was written by an older version of this script: train again")
    return ck


def train(cfg, data, out, device, resume=False):
    """DP-SGD training; returns (ema model, summary dict). Checkpoints to out/ckpt.pt.
    DIST (torchrun): every rank runs this same loop from the same seed. The Poisson batch,
    the per-example noise draws and the DP noise come from generators that are identical on
    all ranks; only the per-example gradients are split (clipped_grad_sum) and their clipped
    sum is all-reduced. So each step releases exactly what the single-process step releases,
    sum_i clip(g_i) + N(0, sigma^2 C^2 I) over one Poisson batch, and the accountant, the
    model and the EMA are those of one process. Only rank 0 writes checkpoints."""
    rank, size = world()
    x_train, y_train = data["train"]
    x_train, y_train = x_train.to(device), None if y_train is None else y_train.to(device)
    n = len(x_train)
    q, total_steps, sigma_dp = privacy_plan(cfg, n)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"U-Net: {n_params:,} parameters | N = {n} | q = {q:.5g} (expected batch {q * n:.0f}) "
          f"| {total_steps} steps | K = {cfg.K} | sigma_dp = {sigma_dp:.4f} for "
          f"(eps = {cfg.eps}, delta = {cfg.delta})" + (f" | {size} processes" if size > 1 else ""))
    ckpt_path, step, spent = out / "ckpt.pt", 0, 0.0  # spent: training seconds before resume
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, device)
        diff = {k: (ck["config"].get(k), v) for k, v in asdict(cfg).items() if k not in RUNTIME
                and ck["config"].get(k) != (list(v) if isinstance(v, tuple) else v)}
        if diff or ck["summary"]["n"] != n:
            raise UserError(f"{ckpt_path} belongs to another configuration (checkpoint vs now: "
                            f"{diff or {'N': (ck['summary']['n'], n)}}). Use the same flags to "
                            f"resume, or another --out to start a new run.")
        model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"]), gen.set_state(ck["rng"].cpu())
        step, spent = ck["summary"]["steps"], ck["summary"]["train_time_s"]
        # steps a crash lost after this checkpoint were never released
        # (no checkpoint, no output), and are redone from the saved RNG state: counting
        # `step` covers every released step, exactly as in an uninterrupted run.
        print(f"resumed from {ckpt_path} at step {step}: eps spent so far "
              f"{epsilon(q, sigma_dp, step, cfg.delta):.4f}"
              + (" (training had finished: sampling again)" if step == total_steps else ""))
    elif resume:
        print(f"--resume: no checkpoint in {out}, starting from scratch")

    def summary():  # what a run reports: in every checkpoint and in metrics.json
        return {"q": q, "sigma_dp": sigma_dp, "steps": step, "total_steps": total_steps, "n": n,
                "n_params": n_params, "train_time_s": spent + time.time() - t0,
                "eps_spent": epsilon(q, sigma_dp, step, cfg.delta)}

    def checkpoint():
        if size > 1:  # DIST: a diverged rank would be a bug; fail loudly, never silently
            fingerprint = torch.stack([p.double().sum() for p in model.parameters()])
            rank0 = fingerprint.clone()
            dist.broadcast(rank0, 0)
            if not torch.equal(fingerprint, rank0):
                raise RuntimeError(f"rank {rank}'s model differs from rank 0's")
        if rank > 0:
            return
        save_checkpoint(ckpt_path, {
            "config": json.loads(json.dumps(asdict(cfg))), "summary": summary(),
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "rng": gen.get_state()})

    t0, seen, start = time.time(), 0, step
    while step < total_steps:
        idx = poisson_batch(n, q, gen)
        stats = dp_step(model, opt, x_train[idx], None if y_train is None else y_train[idx],
                        cfg, sigma_dp, q * n, gen, model.n_classes)
        step += 1  # the accountant counts every step that released a noisy gradient
        ema_update(ema, model, step, cfg.ema)
        seen += stats["n"]
        if step % cfg.ckpt_every == 0 or step == total_steps:
            checkpoint()
        if step % cfg.log_every == 0 or step == total_steps:
            el = time.time() - t0
            left = el / (step - start) * (total_steps - step)
            print(f"step {step:5d}/{total_steps} | loss {stats['loss']:.4f} | eps "
                  f"{epsilon(q, sigma_dp, step, cfg.delta):.3f}/{cfg.eps} | {seen / el:6.0f} ex/s"
                  f" | {el / 60:5.1f} min, {left / 60:5.1f} min left", flush=True)
    # (the printed loss is a statistic of private data outside the DP guarantee: monitor
    #  it, do not publish it; nothing of it goes into metrics.json)
    return ema, summary()


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def edm_sampler(net, y, cfg, gen, shape, param="edm"):
    """EDM Alg. 2. Noise levels t_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
    t_n = 0. churn: before each step raise the noise from t to t(1+gamma), gamma =
    min(S_churn/n, sqrt2 - 1) for t in [S_min, S_max], then a Heun step; heun: gamma = 0;
    ddim: gamma = 0 and Euler steps (DDIM is Euler on the probability-flow ODE)."""
    null = None if y is None else torch.full_like(y, net.n_classes)

    def D(x, t):
        s = torch.full((len(x), 1, 1, 1), float(t), device=x.device)
        d = denoise(net, x, s, y, param)
        if cfg.guidance and y is not None:  # classifier-free guidance
            d = (1 + cfg.guidance) * d - cfg.guidance * denoise(net, x, s, null, param)
        return d

    n, r = cfg.sample_steps, 1 / cfg.rho
    i = torch.arange(n, dtype=torch.float64)
    ts = (cfg.sigma_max ** r + i / max(n - 1, 1) * (cfg.sigma_min ** r - cfg.sigma_max ** r)) ** cfg.rho
    ts = torch.cat([ts, torch.zeros(1, dtype=torch.float64)]).tolist()
    x = ts[0] * torch.randn(shape, generator=gen, device=gen.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        gamma = (min(cfg.s_churn / n, math.sqrt(2) - 1)
                 if cfg.sampler == "churn" and cfg.s_min <= t <= cfg.s_max else 0.0)
        t_hat = t * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(t_hat ** 2 - t ** 2) * cfg.s_noise * torch.randn(
                shape, generator=gen, device=gen.device)
        d = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if cfg.sampler != "ddim" and t_next > 0:  # Heun's 2nd-order correction
            x_next = x + (t_next - t_hat) * (d + (x_next - D(x_next, t_next)) / t_next) / 2
        x = x_next
    return x.clamp(-1, 1)


def generate(net, cfg, num, device, batch=1000, seed=1):
    """Class-balanced samples, labels 0,1,..,9,0,1,.. (unconditional if net.n_classes = 0)
    -> uint8 images [num, H, W] (grayscale) or [num, H, W, 3], and the labels."""
    gen = torch.Generator(device).manual_seed(seed)
    labels = torch.arange(num, device=device) % max(net.n_classes, 1)
    xs, t0 = [], time.time()
    for i in range(0, num, batch):
        y = labels[i:i + batch]
        shape = (len(y), *net.img_shape)
        xs.append(edm_sampler(net, y if net.n_classes else None, cfg, gen, shape, cfg.param).cpu())
        done, el = i + len(y), time.time() - t0
        if done < num:
            print(f"  {done}/{num} samples | {el / 60:.1f} min, {el / done * (num - done) / 60:.1f} "
                  f"min left", flush=True)
    x = torch.cat(xs).permute(0, 2, 3, 1)
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return (x[..., 0] if x.shape[-1] == 1 else x), labels.cpu().numpy()


def save_outputs(out, x, y, cfg, summary, n_classes=10, cols=10):
    """grid.png (row c = class c; unconditional: the first 100), samples.npz (x uint8
    [n,H,W] or [n,H,W,3], y), metrics.json."""
    rows = ([x[y == c][:cols] for c in range(n_classes)] if n_classes else
            [x[i:i + cols] for i in range(0, min(len(x), cols * cols), cols)])
    grid = np.concatenate([np.concatenate(list(r) + [np.zeros_like(x[0])] * (cols - len(r)), 1)
                           for r in rows], 0)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out / "grid.png")
    np.savez_compressed(out / "samples.npz", x=x, y=y)
    metrics = {"config": asdict(cfg), "delta": cfg.delta, "eps_target": cfg.eps, **summary,
               "accountant": "RDP of the Poisson-subsampled Gaussian, orders 1.25-11.75 "
                             "(step 0.25) and 12-256, Balle et al. 2020 conversion",
               "num_samples": len(x)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'grid.png'}, {out / 'samples.npz'} ({len(x)} samples), "
          f"{out / 'metrics.json'}")


# ----------------------------------------------------------------------------- evaluation
# The paper's two yardsticks (DPDM Sec. 5): FID, and the accuracy on real test data of
# classifiers trained only on generated data.
# ---- FID: Frechet distance between Gaussians fitted to Inception-v3 pool features -------
# FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})          (Heusel et al. 2017, eq. 6)
# Features: the TF Inception graph `inception-2015-12-05` in NVIDIA's TorchScript port
# (StyleGAN2-ADA metrics; DPDM/EDM load NVIDIA's Python pickle of the same port, which has no
# published hash and runs code when unpickled). Input: NCHW uint8 RGB of any size, resized to
# 299x299 inside. sha256 as pinned by crowsonkb/k-diffusion (k_diffusion/evaluation.py).
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                 "metrics/inception-2015-12-05.pt")
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpdm"
FID_NUM_SAMPLES = 60_000  # generated samples per FID (= size of the MNIST reference set)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64 without scipy.
    tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}: both matrices have the same
    eigenvalues, and the second is symmetric PSD, so `eigh` applies twice."""
    mu1, s1, mu2, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def load_inception(cache_dir=None, device="cpu", url=None, sha256=None):
    """Download once to `cache_dir`, check the sha256 of the bytes, and only then load those
    same bytes (TorchScript). A file with another hash is refused before anything parses it."""
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
    feats = []
    for i in range(0, len(x), batch_size):
        b = x[i:i + batch_size].to(device)
        b = b.repeat(1, 3, 1, 1) if b.shape[1] == 1 else b  # grayscale -> RGB
        feats.append(detector(b, return_features=True).double().cpu())
    return torch.cat(feats).numpy()


def feature_stats(images, detector=None, **kw):
    """(mu, sigma) of the Inception features of uint8 images (loads the network if not given)."""
    feats = inception_features(load_inception() if detector is None else detector, images, **kw)
    return feats.mean(0), np.cov(feats, rowvar=False)


def reference_stats(real_images, cache_file, detector=None, **kw):
    """mu, sigma of the real training set, computed once and cached as .npz."""
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


# ---- Downstream utility: train on generated data, select on generated data, test on real -
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


def _as_inputs(x, y):
    """uint8 images in [0, 255] -> float in [-1, 1], shape (N, 1, 28, 28); labels -> int64."""
    x = torch.as_tensor(np.asarray(x))
    x = (x.float() / 127.5 - 1) if x.dtype == torch.uint8 else x.float()
    x = x.reshape(len(x), 1, 28, 28)
    y = torch.as_tensor(np.asarray(y)).long()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (got {len(x)} images, {len(y)} labels)")
    return x, y


@torch.no_grad()
def accuracy(model, x, y, batch_size=1000):
    x, y = _as_inputs(x, y)
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train_classifier(arch, x_train, y_train, x_val, y_val, epochs, batch_size=128, lr=3e-4, seed=0, log=print):
    """Adam on (x_train, y_train); after every epoch, validation accuracy on (x_val, y_val);
    returns the model at its best validation epoch. No test data can enter this function."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    x, y = _as_inputs(x_train, y_train)
    model, gen = make_classifier(arch), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = dict(epoch=0, val_acc=-1.0, curve=[])
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_acc = accuracy(model, x_val, y_val)
        best["curve"].append(val_acc)
        if val_acc > best["val_acc"]:
            best.update(epoch=epoch, val_acc=val_acc, state={k: v.clone() for k, v in model.state_dict().items()})
        log(f"  {arch:6s} epoch {epoch:3d}/{epochs}  loss {loss.item():.3f}  val acc {val_acc:.4f}")
    model.load_state_dict(best.pop("state"))
    return model.eval(), best


def split_generated(x, y, val_fraction=0.1, seed=0):
    """Hold out a random part of the *generated* set for choosing the epoch."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, int(round(val_fraction * len(x))))
    x, y = np.asarray(x), np.asarray(y)
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def evaluate_downstream(gen_x, gen_y, test_x, test_y, epochs, archs=CLASSIFIERS, val_fraction=0.1, seed=0,
                        log=print, **train_kw):
    """Accuracy on the real test set of each classifier trained on generated samples. The
    epoch is chosen on held-out generated data; the test set is read once, afterwards.
    `epochs`: an int, or a dict {arch: epochs}; `train_kw` (batch_size, lr) go to train_classifier."""
    x_tr, y_tr, x_val, y_val = split_generated(gen_x, gen_y, val_fraction, seed)
    results = {}
    for arch in archs:
        t0 = time.time()
        n = epochs[arch] if isinstance(epochs, dict) else epochs
        model, sel = train_classifier(arch, x_tr, y_tr, x_val, y_val, n, seed=seed, log=log, **train_kw)
        results[arch] = dict(test_acc=accuracy(model, test_x, test_y), best_epoch=sel["epoch"],
                             val_acc=sel["val_acc"], epochs=n, seconds=round(time.time() - t0, 1))
        log(f"{arch}: test accuracy {results[arch]['test_acc']:.4f} (epoch {sel['epoch']} chosen on the held-out split)")
    return results


EVAL_EPOCHS = {"cpu": {"logreg": 30, "mlp": 30, "cnn": 10}, "smoke": 1}  # others: 50 (DPDM)


def evaluate(out, x, y, data, cfg, args):
    """Downstream accuracies (and FID with --fid) of the samples x, y; added to metrics.json
    together with the sampler settings that produced them."""
    epochs = args.eval_epochs or EVAL_EPOCHS.get(args.preset, 50)
    ev = {"sampler_setting": args.sampler_setting, "num_samples": len(x),
          "sampler": {k: getattr(cfg, k) for k in SAMPLER_SETTINGS["fid"]}}
    if data["test"] is not None:
        ev["downstream"] = evaluate_downstream(x, y, *data["test"], epochs=epochs)
    elif not args.fid:
        print("CelebA has no labels for downstream classifiers: add --fid for its FID")
    if args.fid:
        try:
            detector = load_inception(device=args.device)
            real = ((data["train"][0] + 1) * 127.5).round().to(torch.uint8).numpy()
            ref = reference_stats(real, INCEPTION_CACHE / f"{cfg.dataset}_train_inception.npz",
                                  detector, device=args.device)
            fake = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> NCHW
            ev["fid"] = compute_fid(fake, ref, detector, device=args.device)
            print(f"FID ({len(x)} samples vs the training set): {ev['fid']:.2f}")
        except RuntimeError as err:  # offline: keep the accuracies, say why FID is missing
            print(f"FID skipped: {err}")
            ev["fid"], ev["fid_error"] = None, str(err)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["eval"] = ev
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


# ----------------------------------------------------------------------------- main
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


def main(argv=None):
    args, cfg = parse_args(argv)
    rank = init_distributed(args)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # TF32 for the network; DP maths is explicit fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    try:
        if args.sample_only or args.eval_only:
            if not args.ckpt or not Path(args.ckpt).exists():
                raise UserError(f"--sample-only and --eval-only need --ckpt PATH of an "
                                f"existing checkpoint (got {args.ckpt})")
            ck = load_checkpoint(args.ckpt, args.device)
            saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"].items()}
            overrides = {k: getattr(cfg, k) for k in RUNTIME if getattr(args, k) is not None}
            cfg = Config(**{**saved, **overrides})
            ema = build_model(cfg).to(args.device)
            ema.load_state_dict(ck["ema"])
            summary = ck["summary"]
            # read the data before sampling: an evaluation must not fail after hours of it
            data = load_data(cfg.dataset, args.data_dir, args.unverified) if args.eval else None
        else:
            print(f"preset '{args.preset}' ({EXPECTED_TIME[args.preset]}). DPDM's own "
                  f"configuration: --preset paper")
            data = load_data(cfg.dataset, args.data_dir, args.unverified)
            ema, summary = train(cfg, data, out, args.device, args.resume)
        if dist.is_initialized():  # DIST: sampling, outputs and evaluation are rank 0's
            dist.destroy_process_group()
            if rank > 0:
                return
        if args.sampler_setting:
            cfg = dataclasses.replace(cfg, **SAMPLER_SETTINGS[args.sampler_setting])
        print(f"sampling {cfg.num_samples} images ({cfg.sampler}, {cfg.sample_steps} steps, "
              f"guidance {cfg.guidance}) ...")
        t0 = time.time()
        x, y = generate(ema.eval(), cfg, cfg.num_samples, args.device)
        summary["sample_time_s"] = time.time() - t0
        save_outputs(out, x, y, cfg, summary, ema.n_classes)
        print(f"(eps, delta) = ({summary['eps_spent']:.4f}, {cfg.delta}) after "
              f"{summary['steps']} steps; sigma_dp = {summary['sigma_dp']:.4f}, q = {summary['q']:.5g}")
        if args.eval:
            evaluate(out, x, y, data, cfg, args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
