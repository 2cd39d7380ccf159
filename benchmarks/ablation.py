"""Ablations of chapter 04 (DPDM Sec. 5.2-5.3 at laptop scale): noise multiplicity K, the sampler,
and (--sweep) quality against eps, DPDM's Table 1 as a curve.

Regenerates the README's ablation table (out/ablation.md) and figures/04_ablation.png:
  (a) K in {1, 4, 16} at the same eps, batch and number of steps (compute grows with K);
  (b) K in {1, 4, 16} at the same eps, number of steps and compute: K x batch x steps constant
      (batch B/K; the DP noise multiplier changes with q = 1/ceil(N/batch));
  (c) deterministic vs stochastic sampling of ONE trained model (the K = 1 model of (a)), by
      `--eval-only` (sampling is post-processing: no privacy cost). --model RUN/model.pt: (c)
      only, on a model trained elsewhere (e.g. a run of the `cpu` preset); no figure.
With --sweep, the privacy-utility sweep instead (out/sweep/sweep.md, figures/04_privacy_utility.png):
at each eps in {0.2, 1, 10}, K = 1 and K = 4 at the same batch and steps, and K = 1 with 4x the
steps (the compute of K = 4), each with its noise multiplier calibrated to that eps and run.
Every run is `python 04_dpdm_mnist.py ... --out DIR` in a subprocess and every number is read
back from that run's metrics.json by one tolerant helper (`lookup`): 04's internals may change.

Beside the paper's downstream accuracies, each row has a "Frechet proxy" (FD-proxy): the
Frechet distance between Gaussians fitted to the 128-d penultimate features of a small CNN
trained once on the real training images (cached in OUT/proxy_cnn.pt), generated samples vs the
real test set. It is a proxy for sample quality on MNIST only, NOT comparable with the paper's
Inception FID. The table also gives its floor: as many real training images vs the test set.
The proxy's network and floor use the private training images outside the DP mechanism: the
FD-proxy is outside the privacy guarantee (a yardstick for the method, not a release).

    python benchmarks/ablation.py --quick              # < 1 min: smoke preset, tiny synthetic data (a test)
    python benchmarks/ablation.py --data-dir DIR       # full: real MNIST, two 1-thread 04 processes at a time
    python benchmarks/ablation.py --sweep --data-dir DIR  # the sweep: 9 runs, 59 min on 2 cores

Full mode: the cpu preset's model and sampler at batch 500 (q = 1/120) for 2 epochs = 240 steps,
eps = 10, 5,000 samples per run, classifiers 15 epochs. (a) costs 1 + 4 + 16 units of 120k
per-example gradients (K = 16 alone: ~2M, 40-65 min at the 520-830 per-example gradients/s
of one core, depending on the machine), (b) 1 unit each; with (c) about an hour with --jobs 2 on a 2-core machine.
Sweep: the `cpu` preset's model and sampler at batch 250 (q = 1/240) for 2 epochs = 480 steps
(units of 120k per-example gradients: 1 + 4 + 4 per eps, 27 in all; 59 min with --jobs 2 on the
2-core box); the K = 1 runs with 4x the steps train 1,920 steps (the `cpu` preset: 2,400). The
paper's Table 1 (MNIST) is drawn beside as markers.
Reduced runs: --ks, --batch, --epochs, --max-units (skip the most expensive (a) runs). A finished
run (its metrics.json has accuracies) is reused: delete its folder to redo it. --script chooses
the 04 file to drive (default: the one beside benchmarks/).
"""
import argparse
import gzip
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "04_dpdm_mnist.py"
ARCHS = ("logreg", "mlp", "cnn")

# The sampler settings of (c). Deterministic: DDIM (Euler on the probability-flow ODE; DPDM's
# default) and Heun. Stochastic: DPDM's stochastic DDIM, and EDM churn with DPDM's per-step cap
# gamma <= 1 at the paper's MNIST eps=10 "acc" churn (S_churn 10, S_min 0.025) on 50 instead of
# 1,000 levels. Each is a list of 04 flags.
SAMPLERS = {
    "ddim 50 (det.)": ["--sampler", "ddim", "--sample-steps", "50", "--guidance", "0"],
    "heun 25 (det.)": ["--sampler", "heun", "--sample-steps", "25", "--guidance", "0"],
    "ddim-stochastic 50": ["--sampler", "ddim-stochastic", "--sample-steps", "50", "--guidance", "0"],
    "churn 25, S_churn 10": ["--sampler", "churn", "--sample-steps", "25", "--s-churn", "10",
                             "--s-min", "0.025", "--s-max", "50", "--guidance", "0"],
}
QUICK_SAMPLERS = {"ddim 4 (det.)": ["--sampler", "ddim", "--sample-steps", "4"],
                  "churn 4, S_churn 10": ["--sampler", "churn", "--sample-steps", "4", "--s-churn", "10",
                                          "--s-min", "0.025", "--s-max", "50"]}


# ----------------------------------------------------------------------------- metrics.json
def lookup(d, *keys, default=None):
    """The value of the first of `keys` found anywhere in the nested dict d (depth first), so
    that metrics.json may move a number to another section without breaking this script."""
    for key in keys:
        stack = [d]
        while stack:
            cur = stack.pop()
            if isinstance(cur, dict):
                if key in cur:
                    return cur[key]
                stack.extend(reversed(list(cur.values())))
    return default


def read_metrics(run_dir):
    """The numbers of one run: eps, noise multiplier, q, steps, times, accuracies (%), or None."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    down = lookup(m, "downstream", default={}) or {}
    acc = {a: lookup(down.get(a, {}), "test_acc", "acc", "accuracy") for a in ARCHS}
    return {"eps": lookup(m, "eps_spent", "eps"), "noise_multiplier": lookup(m, "noise_multiplier", "sigma_dp"),
            "q": lookup(m, "q"), "steps": lookup(m, "steps"), "K": lookup(m, "K"), "batch": lookup(m, "batch"),
            "train_s": lookup(m, "train_s"), "sample_s": lookup(m, "sample_s"),
            "eval_s": lookup(m, "eval_s"),
            **{a: None if v is None else 100 * v for a, v in acc.items()}}


# ----------------------------------------------------------------------------- data (IDX files)
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(folder, name):
    for f in (name + ".gz", name):
        p = Path(folder) / f
        if p.exists():
            raw = p.read_bytes()
            raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
            ndim = raw[3]
            dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
            return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    raise SystemExit(f"error: missing {name}(.gz) in {folder}")


def write_idx(path, arr):
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    Path(path).write_bytes(head + arr.astype(np.uint8).tobytes())


def make_synthetic(folder, n_train=128, n_test=50, seed=0):
    """Tiny MNIST-shaped data for --quick: class c is a noisy bright 6x6 square at a position
    that depends on c. Written as raw IDX files (04 reads them with --unverified)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(y):
            r, col = 3 + 5 * (c // 4), 3 + 6 * (c % 4)
            x[i, r:r + 6, col:col + 6] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y)
    return folder


# ----------------------------------------------------------------------------- Frechet proxy
def proxy_cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def as_float(x_uint8):
    return torch.as_tensor(np.array(x_uint8)).float().div(127.5).sub(1).reshape(-1, 1, 28, 28)


def train_proxy(x, y, path, epochs):
    """The proxy's feature extractor: a small CNN trained ONCE on real training images (Adam
    1e-3, batch 128); cached with the size of the data it saw, reused while that matches."""
    if path.exists():
        ck = torch.load(path, weights_only=True)
        if ck["n_train"] == len(x):
            net = proxy_cnn()
            net.load_state_dict(ck["state"])
            return net.eval()
    torch.manual_seed(0)
    net, xs, ys = proxy_cnn(), as_float(x), torch.as_tensor(np.array(y)).long()
    opt, gen = torch.optim.Adam(net.parameters(), 1e-3), torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(128):
            loss = F.cross_entropy(net(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save({"state": net.state_dict(), "n_train": len(x)}, path)
    return net.eval()


@torch.no_grad()
def proxy_stats(net, x_uint8):
    f = torch.cat([net[:-1](b) for b in as_float(x_uint8).split(1000)]).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(a, b):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) (Heusel et al. 2017, eq. 6)."""
    (mu1, s1), (mu2, s2) = a, b
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


# ----------------------------------------------------------------------------- running 04
def run_04(args, out, flags, log):
    """One `python 04_dpdm_mnist.py` subprocess writing to out/; skipped when out/ already
    holds an evaluated metrics.json. Returns its numbers."""
    done = read_metrics(out)
    if done and done["cnn"] is not None:
        return done
    cmd = [sys.executable, str(args.script), "--out", str(out), "--threads", "1",
           "--data-dir", str(args.data_dir), "--overwrite", *(["--unverified"] if args.quick else []), *flags]
    log(" ".join(cmd[1:]))
    t0 = time.time()
    with open(str(out) + ".log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({rc}); see {out}.log")
    res = read_metrics(out)
    res["wall_s"] = time.time() - t0
    (Path(out) / "ablation_wall_s.txt").write_text(f"{res['wall_s']:.1f}\n")
    return res


def plan(args):
    """{name: (flags, group, K)} of the training runs: (a) same batch and steps, (b) same compute."""
    runs = {}
    for K in args.ks:
        runs[f"a_K{K}"] = (training_flags(args, args.eps, K, args.batch, args.epochs), "a", K)
        if K > 1:  # same steps: batch/K and epochs/K; K x batch x steps = batch x steps of K = 1
            b = max(1, round(args.batch / K))
            runs[f"b_K{K}"] = (training_flags(args, args.eps, K, b, args.epochs * b / args.batch), "b", K)
    return runs


def training_flags(args, eps, K, batch, epochs):
    """04's flags of one training run at the preset's model and sampler."""
    chunk = batch if args.quick else max(8, args.chunk // K)
    return ["--preset", "smoke" if args.quick else "cpu", "--num-samples", str(args.num_samples),
            "--eval", "--eval-epochs", str(args.eval_epochs), *args.sampler_args, "--eps", str(eps),
            "--K", str(K), "--batch", str(batch), "--epochs", f"{epochs:g}", "--chunk", str(chunk)]


def plan_sweep(args):
    """{name: (flags, eps, K, steps factor)} of the privacy-utility sweep: at each eps, every K at
    the same batch and steps, and K = 1 with K times the steps (the compute of K)."""
    runs = {}
    for eps in args.eps_list:
        for K in args.ks:
            runs[f"eps{eps:g}_K{K}"] = (training_flags(args, eps, K, args.batch, args.epochs), eps, K, 1)
            if K > 1:
                runs[f"eps{eps:g}_K1_x{K}"] = (training_flags(args, eps, 1, args.batch, K * args.epochs), eps, 1, K)
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke preset on tiny synthetic data (< 1 min)")
    p.add_argument("--sweep", action="store_true", help="the privacy-utility sweep (eps x K) instead of "
                   "the ablations (a)-(c)")
    p.add_argument("--data-dir", help="MNIST IDX files (full mode)")
    p.add_argument("--out", help="default out/ablation or out/sweep (quick: ..._quick)")
    p.add_argument("--figure", help="default figures/04_ablation.png or figures/04_privacy_utility.png "
                   "(quick: in OUT)")
    p.add_argument("--script", default=str(SCRIPT), help="the 04 script to drive")
    p.add_argument("--jobs", type=int, default=2, help="04 processes at a time (one thread each)")
    p.add_argument("--eps", type=float, default=10.0, help="eps of the ablations")
    p.add_argument("--eps-list", type=float, nargs="+", default=[0.2, 1, 10], help="eps values of the sweep")
    p.add_argument("--ks", type=int, nargs="+", help="noise multiplicities (ablations 1 4 16, sweep 1 4)")
    p.add_argument("--batch", type=int, help="batch of (a), of K = 1 and of the sweep (full: ablations 500, "
                   "sweep 250; quick 32)")
    p.add_argument("--epochs", type=float, help="epochs of (a) and of the sweep's equal-steps runs (full 2: "
                   "240 steps at batch 500, 480 at 250; quick 1)")
    p.add_argument("--num-samples", type=int, help="samples per run (full 5000, quick 20)")
    p.add_argument("--eval-epochs", type=int, help="classifier epochs (full 15, quick 1)")
    p.add_argument("--max-units", type=float, help="skip (a) runs costing more than this many times the "
                   "K = 1 run (reduced runs; the table says 'not run')")
    p.add_argument("--chunk", type=int, default=320, help="examples x K per vmap call (320: one call for "
                   "a Poisson batch of 250, whose standard deviation is 16)")
    p.add_argument("--model", help="(c) only: sample this model.pt (its folder holds the run's metrics.json "
                   "and samples.npz) instead of training (a) and (b); default out: out/ablation_samplers")
    p.add_argument("--sampler-args", nargs=argparse.REMAINDER, default=None,
                   help="04 sampler flags of the training runs (default: the preset's sampler)")
    a = p.parse_args(argv)
    full = dict(batch=250 if a.sweep else 500, epochs=2.0, num_samples=5000, eval_epochs=15)
    quick = dict(batch=32, epochs=1.0, num_samples=20, eval_epochs=1)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.ks = a.ks or ([1, 4] if a.sweep else [1, 4, 16])
    if a.sampler_args is None:  # the training runs sample with the preset's sampler
        a.sampler_args = ["--sample-steps", "4"] if a.quick else []
    a.name = "sweep" if a.sweep else "ablation"
    a.out = Path(a.out or ROOT / "out" / (a.name + ("_samplers" if a.model else "") + ("_quick" if a.quick else "")))
    png = "04_privacy_utility.png" if a.sweep else "04_ablation.png"
    a.figure = Path(a.figure or (a.out / png if a.quick else ROOT / "figures" / png))
    if a.model and not (Path(a.model).parent / "metrics.json").exists():
        p.error(f"--model: no metrics.json beside {a.model}; give the model.pt of a finished 04 run")
    if a.quick:
        a.data_dir = make_synthetic(a.out / "data")
    elif not a.data_dir:
        p.error("full mode needs --data-dir (the four MNIST IDX files); or --quick")
    a.script = Path(a.script)
    return a


def fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(s):  # one write per line, so that the lines of parallel runs do not interleave
        sys.stdout.write(f"[{(time.time() - t_start) / 60:5.1f} min] {s}\n")
        sys.stdout.flush()

    # the Frechet proxy's network and the real test statistics (also the real-data floor)
    xtr, ytr = read_idx(args.data_dir, IDX[0]), read_idx(args.data_dir, IDX[1])
    xte = read_idx(args.data_dir, IDX[2])
    net = train_proxy(xtr, ytr, args.out / "proxy_cnn.pt", epochs=1 if args.quick else 2)
    test_stats = proxy_stats(net, xte)
    floor_idx = np.random.default_rng(0).permutation(len(xtr))[:args.num_samples]
    floor = frechet(proxy_stats(net, xtr[floor_idx]), test_stats)

    def fd(run_dir):
        z = np.load(Path(run_dir) / "samples.npz")
        return frechet(proxy_stats(net, z["x"]), test_stats)

    table = (sweep if args.sweep else ablation)(args, fd, floor, log)
    print(table)
    log(f"wrote {args.out / args.name}.md, {args.out / args.name}.json" + ("" if args.model else f", {args.figure}"))


def run_all(args, runs, log):
    """{name: numbers} of run_04 over {name: (out dir, flags, cost)}, --jobs at a time, the most
    expensive first (so that the last to finish is a cheap one)."""
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {n: pool.submit(run_04, args, out, flags, log)
                   for n, (out, flags, cost) in sorted(runs.items(), key=lambda kv: -kv[1][2])}
        return {n: f.result() for n, f in futures.items()}


def sweep(args, fd, floor, log):
    """The privacy-utility sweep: table OUT/sweep.md (+ .json) and the figure; returns the table."""
    runs = plan_sweep(args)
    results = run_all(args, {n: (args.out / n, flags, K * f) for n, (flags, eps, K, f) in runs.items()}, log)
    results = {n: results[n] for n in runs}  # plan order: by eps, then K
    for n, r in results.items():
        r["fd_proxy"], r["eps_target"], r["label"] = fd(args.out / n), runs[n][1], sweep_label(runs[n][2], runs[n][3])
    lines = [f"Privacy-utility sweep ({'QUICK: smoke preset on synthetic data, numbers meaningless' if args.quick else 'real MNIST'}): "
             f"the `{'smoke' if args.quick else 'cpu'}` preset's model and sampler, batch {args.batch}, {args.epochs:g} epochs "
             f"(x K for the equal-compute rows), delta 1e-5; {args.num_samples} samples per run, classifiers "
             f"{args.eval_epochs} epochs; one run per row. FD-proxy: Frechet distance of small-CNN features to the "
             f"real test set (a proxy, not the paper's Inception FID); floor ({args.num_samples} real training "
             f"images): {floor:.2f}.", "",
             "| eps (target) | eps spent (accountant) | run | K | steps | noise multiplier | compute (K x B x steps) | "
             "train time | LogReg / MLP / CNN (%) | FD-proxy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        lines.append(f"| {r['eps_target']:g} | {fmt(r['eps'], '.4f')} | {r['label']} | {r['K']} | {r['steps']} | "
                     f"{fmt(r['noise_multiplier'], '.3f')} | {r['K'] * r['batch'] * r['steps'] / 1e3:,.0f}k | "
                     f"{fmt((r['train_s'] or 0) / 60)} min | {fmt(r['logreg'])} / {fmt(r['mlp'])} / {fmt(r['cnn'])} | "
                     f"{r['fd_proxy']:.2f} |")
    table = "\n".join(lines)
    (args.out / "sweep.md").write_text(table + "\n")
    (args.out / "sweep.json").write_text(json.dumps({"runs": results, "fd_floor": floor,
                                                      "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    plot_sweep(args, results)
    return table


def sweep_label(K, steps_factor):
    return f"K = 1, {steps_factor}x steps (compute of K = {steps_factor})" if steps_factor > 1 else f"K = {K}"


def ablation(args, fd, floor, log):
    """(a), (b) and (c), or (c) alone with --model: table OUT/ablation.md (+ .json) and the figure
    (not with --model); returns the table."""
    runs = {} if args.model else plan(args)
    skipped = [n for n in runs if args.max_units and n.startswith("a") and runs[n][2] > args.max_units]
    for n in skipped:
        log(f"skipping {n} (--max-units {args.max_units})")
        del runs[n]
    cost = lambda n: runs[n][2] if n.startswith("a") else 1  # (b): K x batch/K, one unit each
    results = run_all(args, {n: (args.out / n, runs[n][0], cost(n)) for n in runs}, log)
    # (c): samplers on the given model, or on that of a_K1 (shared by (a) and (b))
    base = Path(args.model).parent if args.model else args.out / f"a_K{min(args.ks)}"
    as_trained = read_metrics(base) if args.model else results[f"a_K{min(args.ks)}"]
    as_trained["fd_proxy"] = fd(base)
    if not args.model:
        results["b_K1"] = as_trained
    model = base / "model.pt"
    samplers = QUICK_SAMPLERS if args.quick else SAMPLERS
    common = ["--eval-only", "--ckpt", str(model), "--num-samples", str(args.num_samples),
              "--eval-epochs", str(args.eval_epochs)]
    sampled = run_all(args, {s: (args.out / f"c_{i}", [*common, *flags], 1)
                             for i, (s, flags) in enumerate(samplers.items())}, log)
    sampled = {s: sampled[s] for s in samplers}
    for name, r in results.items():
        if "fd_proxy" not in r:  # b_K1 is a_K1's
            r["fd_proxy"] = fd(args.out / name)
    for i, (s, r) in enumerate(sampled.items()):
        r["fd_proxy"] = fd(args.out / f"c_{i}")

    # table and figure
    lines = [f"Ablations at eps = {args.eps} ({'QUICK: smoke preset on synthetic data, numbers meaningless' if args.quick else 'real MNIST'}); "
             f"{args.num_samples} samples per run, classifiers {args.eval_epochs} epochs. FD-proxy: Frechet distance "
             f"of small-CNN features to the real test set (a proxy, not the paper's Inception FID); "
             f"floor ({args.num_samples} real training images): {floor:.2f}."]
    if results:
        lines += ["", "| run | K | batch (q) | steps | noise multiplier | compute (K x B x steps) | train time | LogReg / MLP / CNN (%) | FD-proxy |",
                  "|---|---|---|---|---|---|---|---|---|"]
    rows = {n: None for n in skipped}
    rows.update(results)
    for name in sorted(rows, key=lambda n: (n[0], int(n.split("K")[1]))):
        r = rows[name]
        what = "same steps and batch" if name[0] == "a" else "same steps and compute"
        if r is None:
            lines.append(f"| ({name[0]}) {what} | {name.split('K')[1]} | {args.batch} | | | | not run (--max-units) | | |")
            continue
        comp = (r["K"] or 0) * (r["batch"] or 0) * (r["steps"] or 0)
        lines.append(f"| ({name[0]}) {what} | {r['K']} | {r['batch']} ({fmt(r['q'], '.4g')}) | {r['steps']} | "
                     f"{fmt(r['noise_multiplier'], '.3f')} | {comp / 1e3:,.0f}k | {fmt((r['train_s'] or 0) / 60)} min | "
                     f"{fmt(r['logreg'])} / {fmt(r['mlp'])} / {fmt(r['cnn'])} | {r['fd_proxy']:.2f} |")
    which = args.model if args.model else f"a, K = {min(args.ks)}"
    lines += ["", f"(c) one trained model ({which}), sampled again with --eval-only:", "",
              "| sampler | sampling time | LogReg / MLP / CNN (%) | FD-proxy |", "|---|---|---|---|"]
    for s, r in {"as trained (the preset's sampler)": as_trained, **sampled}.items():
        lines.append(f"| {s} | {fmt((r['sample_s'] or 0) / 60)} min | {fmt(r['logreg'])} / {fmt(r['mlp'])} / "
                     f"{fmt(r['cnn'])} | {r['fd_proxy']:.2f} |")
    table = "\n".join(lines)
    (args.out / "ablation.md").write_text(table + "\n")
    (args.out / "ablation.json").write_text(json.dumps({"runs": results, "samplers": sampled, "fd_floor": floor,
                                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    if not args.model:
        plot(args, results, sampled, floor)
    return table


def plot(args, results, sampled, floor):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for group, label, style in (("a", "(a) same batch and steps", "o-"), ("b", "(b) same compute", "s--")):
        ks = [k for k in sorted(args.ks) if f"{group}_K{k}" in results]
        rs = [results[f"{group}_K{k}"] for k in ks]
        ax[0].plot(ks, [r["cnn"] for r in rs], style, label=label)
        ax[1].plot(ks, [r["fd_proxy"] for r in rs], style, label=label)
    ax[1].axhline(floor, color="gray", lw=0.8, ls=":", label="real images (floor)")
    for a, t in ((ax[0], "CNN accuracy on real test set (%)"), (ax[1], "FD-proxy (lower is better)")):
        a.set_xscale("log", base=2)
        a.set_xticks(sorted(args.ks), [str(k) for k in sorted(args.ks)])
        a.set_xlabel("noise multiplicity K")
        a.set_title(t, fontsize=10)
        a.legend(fontsize=8)
    names = list(sampled)
    ax[2].bar(range(len(names)), [sampled[n]["cnn"] or 0 for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax[2].text(i, (sampled[n]["cnn"] or 0) + 0.5, f"FD {sampled[n]['fd_proxy']:.1f}", ha="center", fontsize=8)
    ax[2].set_xticks(range(len(names)), names, rotation=20, fontsize=8, ha="right")
    lo = min([sampled[n]["cnn"] or 0 for n in names] + [100])
    ax[2].set_ylim(max(0, lo - 10), 100)
    ax[2].set_title("(c) samplers, one model: CNN accuracy (%)", fontsize=10)
    fig.suptitle(f"DPDM ablations at eps = {args.eps}" + (" (QUICK: synthetic data)" if args.quick else " on MNIST") +
                 f": base batch {args.batch}, {args.epochs:g} epochs, {args.num_samples} samples, classifiers "
                 f"{args.eval_epochs} epochs; FD-proxy is not the paper's FID", fontsize=10)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)


# DPDM's Table 1, MNIST, delta 1e-5 (paper; also dpdm_facts): CNN accuracy (%) of the "Acc" sampler
# setting and FID of the "FID" setting, at eps 0.2 / 1 / 10; 1.75M-parameter U-Net, K = 32, batch
# 4,096 (a third-party rerun of one such model took ~13 h on 4 A100s, i.e. ~50 GPU-hours).
PAPER_MNIST = {"eps": (0.2, 1, 10), "cnn": (86.3, 95.3, 98.1), "fid": (61.9, 23.4, 5.01)}


def plot_sweep(args, results):
    """CNN accuracy and FD-proxy against eps (log axis), one line per run kind, paper markers beside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.9))
    paper = "paper (1.75M-param U-Net, ~50 GPU-hours)"
    for label in dict.fromkeys(r["label"] for r in results.values()):
        rs = sorted((r for r in results.values() if r["label"] == label), key=lambda r: r["eps_target"])
        style = "s--" if "steps" in label else "o-"
        ax[0].plot([r["eps"] for r in rs], [r["cnn"] for r in rs], style, label=label)
        ax[1].plot([r["eps"] for r in rs], [r["fd_proxy"] for r in rs], style, label=label)
    ax[0].plot(PAPER_MNIST["eps"], PAPER_MNIST["cnn"], "k*", ms=10, label=paper + ", Acc setting")
    twin = ax[1].twinx()  # the paper's Inception FID is on another scale: its own axis
    twin.plot(PAPER_MNIST["eps"], PAPER_MNIST["fid"], "k*", ms=10, label=paper + ", FID (right axis)")
    twin.set_ylabel("paper's Inception FID", fontsize=9)
    for a, t in ((ax[0], "CNN accuracy on the real test set (%)"), (ax[1], "FD-proxy (lower is better)")):
        a.set_xscale("log")
        a.set_xticks(PAPER_MNIST["eps"], [f"{e:g}" for e in PAPER_MNIST["eps"]])
        a.set_xlabel("epsilon (delta = 1e-5), as the accountant reports it")
        a.set_title(t, fontsize=10)
    ax[0].legend(fontsize=7)
    handles = ax[1].get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax[1].legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7)
    fig.suptitle(f"Privacy-utility on {'synthetic data (QUICK)' if args.quick else 'MNIST'}: the "
                 f"`{'smoke' if args.quick else 'cpu'}` preset's model, batch {args.batch}, {args.epochs:g} epochs, "
                 f"{args.num_samples} samples, one run per point; FD-proxy is not the paper's FID", fontsize=9)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)


if __name__ == "__main__":
    main()
