"""Benchmark for chapter 04: the time of one training step of the `cpu` preset at a few torch
thread counts, and what the chunk padding (`PAD_TO`, `pad_rows`) buys.

A Poisson batch has a new size at every step (Binomial(N, q), mean qN). On a CPU a new tensor
shape costs time and memory, so 04 pads each vmap chunk to a multiple of PAD_TO rows and drops
the padded rows' gradients before clipping. Four ways to take a step of the cpu preset's U-Net,
each timed in its own process (the cost of new shapes builds up inside a process, so modes must
not share one):
  dp, unpadded   : dp_sgd_step on Poisson batches with PAD_TO = 1 (every size as it comes)
  dp, padded     : dp_sgd_step on Poisson batches with 04's PAD_TO
  dp, fixed size : dp_sgd_step on batches of exactly qN (not DP-SGD's sampling: a lower bound)
  non-private    : the mean loss of the same padded Poisson batches, .backward(), Adam
Every mode runs at every thread count of --threads. Each process runs --warmup steps, then
times --steps; the table gives, per mode and thread count, the median time per step over
--repeats processes (run one after another, modes and thread counts interleaved, so that a
change in the machine's load hits all alike), the examples per second it makes (qN / time per
step) and the ratio to the non-private step at the same thread count. Random images stand in
for MNIST: the time does not depend on the pixels. Ratios carry over between machines better
than absolute times.

    python benchmarks/bench_04_step.py                   # 3 repeats x 4 modes x threads 1 and 2
    python benchmarks/bench_04_step.py --threads 1 --repeats 1 --steps 10 --warmup 2  # quick
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
MODES = ("dp, unpadded", "dp, padded", "dp, fixed size", "non-private")


def load_04():
    spec = importlib.util.spec_from_file_location("dpdm", ROOT / "04_dpdm_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_steps(mode, steps, warmup, threads, n=60_000):
    """{"seconds": per step, "mb": memory at the end, "batch": qN} of one mode, run in a fresh
    process with `threads` torch threads."""
    m = load_04()
    torch.set_num_threads(threads)
    cfg = m.Config(**m.PRESETS["cpu"].config)
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
        fixed = mode == "dp, fixed size"
        idx = torch.arange(cfg.batch) if fixed else m.poisson_sample(n, q, gen)
        batch = m.batch_randomness(x[idx], y[idx], cfg, model.n_classes, gen)
        if mode == "non-private":
            opt.zero_grad()
            padded = m.pad_rows(list(batch), m.padded_size(len(idx), cfg.chunk))
            loss_fn(model, *padded).mean().backward()
            opt.step()
        else:
            m.dp_sgd_step(model, opt, loss_fn, *batch, C=cfg.clip, noise_multiplier=0.5,
                          expected_batch_size=q * n, generator=gen, chunk_size=cfg.chunk)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    return {"seconds": seconds, "mb": memory_mb(), "batch": cfg.batch}


def memory_mb():
    """Resident memory of this process now (Linux; nan elsewhere)."""
    try:
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return float("nan")


def table_rows(results, batch):
    """results {(mode, threads): [worker result, ...]} -> one row per (mode, threads), thread
    counts in the order given, modes in MODES order: (mode, threads, ms per step (median),
    examples per second, ratio to the non-private step at the same thread count, memory MB)."""
    median = lambda key, field: statistics.median(r[field] for r in results[key])
    rows = []
    for threads in dict.fromkeys(t for _, t in results):
        base = median(("non-private", threads), "seconds")
        for mode in MODES:
            seconds = median((mode, threads), "seconds")
            rows.append((mode, threads, 1e3 * seconds, batch / seconds, seconds / base,
                         median((mode, threads), "mb")))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="time of one cpu-preset training step")
    p.add_argument("--steps", type=int, default=75, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=25, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="processes per mode and thread count")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch thread counts; every mode runs at each")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # one mode, this process
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(time_steps(args.worker, args.steps, args.warmup, args.threads[0])))
        return
    results = {(mode, t): [] for t in args.threads for mode in MODES}
    for r in range(args.repeats):
        for threads in args.threads:
            for mode in MODES:
                cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:  # show the worker's traceback, not just its exit status
                    sys.exit(f"worker {mode!r} at {threads} thread(s) failed:\n{out.stderr}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[mode, threads].append(res)
                print(f"repeat {r + 1}/{args.repeats} | {mode:14s} | {threads} thread(s) | "
                      f"{res['seconds'] * 1e3:6.1f} ms/step | {res['mb']:5.0f} MB", flush=True)
    batch = results[MODES[0], args.threads[0]][0]["batch"]
    print(f"\ncpu preset, expected batch qN = {batch}, {args.steps} timed steps after "
          f"{args.warmup}, median of {args.repeats} processes per mode and thread count:")
    print("| step | threads | ms per step | examples/s | / non-private (same threads) "
          "| memory at the end (MB) |\n|---|---|---|---|---|---|")
    for mode, threads, ms, per_s, ratio, mb in table_rows(results, batch):
        print(f"| {mode} | {threads} | {ms:.0f} | {per_s:.0f} | {ratio:.2f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
