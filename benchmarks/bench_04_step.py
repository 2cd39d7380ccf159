"""Benchmark for chapter 04: the time of one training step of the `cpu` preset, and what the
chunk padding (`PAD_TO`, `pad_rows`) buys.

A Poisson batch has a new size at every step (expected 250, standard deviation 16). On a CPU a new
tensor shape costs time and memory, so 04 pads each vmap chunk to a multiple of PAD_TO = 16 rows
and drops the padded rows' gradients before clipping. Four ways to take a step of the cpu preset's
U-Net (49,540 parameters, K = 1), each timed in its own process (the cost of new shapes builds up
inside a process, so modes must not share one):
  dp, unpadded    : dp_sgd_step on Poisson batches with PAD_TO = 1 (every size as it comes)
  dp, padded      : dp_sgd_step on Poisson batches with PAD_TO = 16 (what 04 does)
  dp, fixed 250   : dp_sgd_step on batches of exactly 250 (not DP-SGD's sampling: a lower bound)
  non-private     : the mean loss of the same padded Poisson batches, .backward(), Adam
Each process runs --warmup steps, then times --steps; the table gives the median over --repeats
processes per mode (run one after another, modes interleaved) and each mode's ratio to the
non-private step. Random images stand in for MNIST: the time does not depend on the pixels.
One torch thread; on a shared machine compare ratios, not absolute times.

    python benchmarks/bench_04_step.py                   # 3 repeats x 4 modes, about 8 min
    python benchmarks/bench_04_step.py --repeats 1 --steps 10 --warmup 2   # a quick look
"""
import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("dp, unpadded", "dp, padded", "dp, fixed 250", "non-private")


def load_04():
    spec = importlib.util.spec_from_file_location("dpdm", ROOT / "04_dpdm_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_steps(mode, steps, warmup, n=60_000):
    """Seconds per step of one mode (run in a fresh process), and the process's memory at the end."""
    m = load_04()
    torch.set_num_threads(1)
    cfg = m.Config(**m.PRESETS["cpu"].train)
    if mode == "dp, unpadded":
        m.PAD_TO = 1  # every Poisson batch size as it comes
    torch.manual_seed(0)
    model = m.build_denoiser(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)  # a benchmark on random images: nothing private here
    x, y = torch.rand(n, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (n,), generator=gen)
    q = cfg.batch / n
    loss_fn = lambda net, *b: m.dpdm_loss(net, *b, sigma_data=model.sigma_data)

    def step():
        idx = torch.arange(cfg.batch) if mode == "dp, fixed 250" else m.poisson_sample(n, q, gen)
        batch = m.batch_randomness(x[idx], y[idx], cfg, model.n_classes, gen)
        if mode == "non-private":
            opt.zero_grad()
            loss_fn(model, *m.pad_rows(list(batch), m.padded_size(len(idx), cfg.chunk))).mean().backward()
            opt.step()
        else:
            m.dp_sgd_step(model, opt, loss_fn, *batch, C=cfg.clip, noise_multiplier=0.5,
                          expected_batch_size=q * n, generator=gen, chunk_size=cfg.chunk)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps, memory_mb()


def memory_mb():
    """Resident memory of this process now (Linux; nan elsewhere)."""
    try:
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return float("nan")


def main():
    p = argparse.ArgumentParser(description="time of one cpu-preset training step, padded or not")
    p.add_argument("--steps", type=int, default=75, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=25, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="processes per mode")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # one mode, in this process
    args = p.parse_args()
    if args.worker:
        print(json.dumps(time_steps(args.worker, args.steps, args.warmup)))
        return
    times, rss = {mode: [] for mode in MODES}, {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
            seconds, mb = json.loads(out.stdout.strip().splitlines()[-1])
            times[mode].append(seconds), rss[mode].append(mb)
            print(f"repeat {r + 1}/{args.repeats} | {mode:14s} | {seconds * 1e3:6.1f} ms/step | {mb:5.0f} MB",
                  flush=True)
    base = statistics.median(times["non-private"])
    print(f"\ncpu preset, one thread, {args.steps} timed steps after {args.warmup}, median of "
          f"{args.repeats} processes per mode:")
    print("| step | ms per step | / non-private | memory at the end (MB) |\n|---|---|---|---|")
    for mode in MODES:
        med = statistics.median(times[mode])
        print(f"| {mode} | {med * 1e3:.0f} | {med / base:.2f} | {statistics.median(rss[mode]):.0f} |")


if __name__ == "__main__":
    main()
