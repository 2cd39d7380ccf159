"""Benchmark for chapter 02: what does privacy cost in compute?

It times one gradient step three ways, on one small U-Net-like denoiser (convolutions,
GroupNorm, self-attention at 7x7; 28x28 inputs, like DPDM's MNIST model but much smaller) and
one batch of B examples with K diffusion-noise draws each:
  non-private : loss.mean().backward() on the B*K noisy images, then SGD
  DP step     : 02's dp_sgd_step: per-example gradients (torch.func), flat clip, noise, update
  naive loop  : B backward passes of one example (with its K draws) each, then clip and noise
Calls are interleaved and each time is the median of --repeats, so that a change in the load of
the machine hits every method alike; compare the ratios to the non-private step, which carry
over between machines better than absolute times. A second table times variants of the DP step
against the same non-private step: no chunking, fixed chunk sizes, channels_last, K folded into
vmap, two threads. --compile adds torch.compile on both sides; --tuned-malloc restarts with
glibc's malloc told to keep freed memory (TUNED_MALLOC).

    python benchmarks/bench_02_dpsgd.py                    # both tables, one thread
    python benchmarks/bench_02_dpsgd.py --no-variants --ks 1 4 --repeats 3    # a quick look
    python benchmarks/bench_02_dpsgd.py --batch 64 --compile --tuned-malloc
"""
import argparse
import importlib.util
import math
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("dpsgd", ROOT / "02_dpsgd_from_scratch.py")
dpsgd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dpsgd)


def parse_args():
    p = argparse.ArgumentParser(description="DP-SGD step cost vs non-private step")
    p.add_argument("--batch", type=int, default=32, help="examples per step, B")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 32], help="noise multiplicities")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per method (median)")
    p.add_argument("--channels", type=int, default=16, help="width of the small U-Net")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, the same for both sides")
    p.add_argument("--images-per-chunk", type=int, default=256,
                   help="DP step: vmap over chunk_size = max(1, this // K) examples at a time")
    p.add_argument("--no-variants", action="store_true", help="only the main table")
    p.add_argument("--compile", action="store_true", help="also try torch.compile (minutes)")
    p.add_argument("--tuned-malloc", action="store_true",
                   help="restart with glibc malloc told to keep freed memory (see TUNED_MALLOC)")
    return p.parse_args()


class SmallUNet(nn.Module):
    """F(x, c_noise): 28 -> 14 -> 7 (attention) -> 14 -> 28 with skip connections."""

    def __init__(self, ch=16):
        super().__init__()
        c2 = 2 * ch
        self.embed = nn.Linear(1, c2)
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.down1, self.norm1 = nn.Conv2d(ch, c2, 3, stride=2, padding=1), nn.GroupNorm(4, c2)
        self.down2, self.norm2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.GroupNorm(4, c2)
        self.qkv, self.proj = nn.Conv2d(c2, 3 * c2, 1), nn.Conv2d(c2, c2, 1)
        self.norm_a = nn.GroupNorm(4, c2)
        self.up1, self.norm3 = nn.Conv2d(c2, c2, 3, padding=1), nn.GroupNorm(4, c2)
        self.up2, self.norm4 = nn.Conv2d(c2, ch, 3, padding=1), nn.GroupNorm(4, ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, c_noise):
        h0 = self.conv_in(x)                                                    # 28x28
        h1 = F.silu(self.norm1(self.down1(h0)))                                 # 14x14
        h2 = F.silu(self.norm2(self.down2(h1) + self.embed(c_noise[:, None])[:, :, None, None]))
        B, C, H, W = h2.shape                                                   # 7x7 attention
        q, k, v = self.qkv(self.norm_a(h2)).flatten(2).chunk(3, dim=1)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), dim=-1)      # [B, HW, HW]
        h2 = h2 + self.proj((v @ attn.transpose(1, 2)).reshape(B, C, H, W))
        h = F.silu(self.norm3(self.up1(F.interpolate(h2, scale_factor=2.0)) + h1))
        h = F.silu(self.norm4(self.up2(F.interpolate(h, scale_factor=2.0)) + h0))
        return self.conv_out(h)


def loss_folding_K_into_vmap(K):
    """Alternative to repeating each example K times inside vmap: vmap over all B*K
    (example, draw) pairs with K=1 each, then average each example's K gradients before
    clipping. Same result, but K times more per-example gradients in memory."""
    def per_example(model, loss_fn, x, sigma, n, chunk_size=None):
        B = x.shape[0]
        g, _ = dpsgd.per_example_grads(model, loss_fn, x.repeat_interleave(K, 0),
                                       sigma.reshape(B * K, 1),
                                       n.reshape(B * K, 1, *x.shape[1:]), chunk_size=chunk_size)
        return {k: v.reshape(B, K, *v.shape[1:]).mean(1) for k, v in g.items()}
    return per_example


def make_steps(model, batch, chunk_size=None, per_example=None, np_chunk_size=None):
    """The closures to time; all update the model with SGD. chunk_size: the DP step's chunks;
    np_chunk_size: the non-private step accumulates gradients over chunks of that size."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    # timing only: a real run draws from dpsgd.secret_generator()
    gen = torch.Generator().manual_seed(0)
    B = batch[0].shape[0]
    kw = dict(C=1.0, noise_multiplier=1.0, expected_batch_size=float(B), generator=gen)

    def non_private():
        opt.zero_grad(set_to_none=True)
        step = np_chunk_size or B
        for start in range(0, B, step):
            (dpsgd.edm_loss(model, *[t[start:start + step] for t in batch]).sum() / B).backward()
        opt.step()

    def dp_step():
        if per_example is None:
            dpsgd.dp_sgd_step(model, opt, dpsgd.edm_loss, *batch, chunk_size=chunk_size, **kw)
            return
        grads = per_example(model, dpsgd.edm_loss, *batch, chunk_size=chunk_size)
        g = dpsgd.clip_per_example(grads, 1.0)
        noisy = dpsgd.add_dp_noise({k: v.sum(0) for k, v in g.items()}, 1.0, 1.0, gen)
        for k, p in model.named_parameters():
            p.grad = noisy[k] / B
        opt.step()

    def naive():
        grads, _ = dpsgd.naive_per_example_grads(model, dpsgd.edm_loss, *batch)
        summed = {k: v.sum(0) for k, v in dpsgd.clip_per_example(grads, 1.0).items()}
        noisy = dpsgd.add_dp_noise(summed, 1.0, 1.0, gen)
        for k, p in model.named_parameters():
            p.grad = noisy[k] / B
        opt.step()
    return {"non-private": non_private, "DP step": dp_step, "naive loop": naive}


def time_interleaved(fns, repeats):
    """Median seconds per call; calls are interleaved so that load changes hit all alike."""
    for f in fns.values():
        f()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def setup(args, K, channels_last=False):
    torch.manual_seed(0)
    model = dpsgd.EDMDenoiser(SmallUNet(args.channels))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 1, 28, 28, generator=gen) * 2 - 1
    batch = (x, *dpsgd.draw_sigma_and_noise(x, K, gen))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        batch = (x_cl, batch[1], batch[2])
    return model, batch


# By default glibc hands every block above ~32 MB back to the OS when freed, so each step
# page-faults its big activations in again (high 'sys' time). These settings keep the memory
# instead, as jemalloc/tcmalloc would (PyTorch's CPU performance guide suggests those).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "MALLOC_TOP_PAD_": "536870912"}


def main():
    args = parse_args()
    if args.tuned_malloc and "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc reads it at start
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **TUNED_MALLOC})
    torch.set_num_threads(args.threads)
    auto_chunk = {K: max(1, args.images_per_chunk // K) for K in args.ks}
    n_params = sum(p.numel() for p in SmallUNet(args.channels).parameters())
    print(f"SmallUNet({args.channels}) with {n_params:,} parameters, 28x28, batch B={args.batch}, "
          f"{args.threads} thread(s), medians of {args.repeats} interleaved repeats; DP step with "
          f"chunk_size = max(1, {args.images_per_chunk} // K); malloc "
          f"{'tuned' if 'MALLOC_MMAP_THRESHOLD_' in os.environ else 'default'}")
    print("\n| K | chunk_size | non-private (ms) | DP step (ms) | naive loop (ms) "
          "| DP / non-private | naive / non-private |")
    print("|---|---|---|---|---|---|---|")
    for K in args.ks:  # each ratio from its own interleaved pair: what runs in between matters
        fns = make_steps(*setup(args, K), auto_chunk[K])
        t = time_interleaved({k: fns[k] for k in ("non-private", "DP step")}, args.repeats)
        t2 = time_interleaved({k: fns[k] for k in ("non-private", "naive loop")}, args.repeats)
        print(f"| {K} | {auto_chunk[K] if auto_chunk[K] < args.batch else 'all'} "
              f"| {1e3 * t['non-private']:.0f} | {1e3 * t['DP step']:.0f} "
              f"| {1e3 * t2['naive loop']:.0f} | {t['DP step'] / t['non-private']:.2f} "
              f"| {t2['naive loop'] / t2['non-private']:.2f} |", flush=True)
    if args.no_variants:
        return

    print("\nVariants: DP step / plain non-private step, same run. In brackets: / a non-private")
    print("step that accumulates its gradient over the same chunks (chunking helps it too).")
    print("\n| variant | " + " | ".join(f"K={K}" for K in args.ks) + " |")
    print("|---|" + "---|" * len(args.ks))
    variants = [("no chunking", dict(chunk=None)),
                ("chunk_size=4", dict(chunk=4)), ("chunk_size=8", dict(chunk=8)),
                ("channels_last (auto chunk)", dict(channels_last=True)),
                ("fold K into vmap (B*K pairs, no chunking)", dict(fold=True, chunk=None)),
                ("2 threads, both sides (auto chunk)", dict(threads=2))]
    for name, v in variants:
        cells = []
        for K in args.ks:
            torch.set_num_threads(v.get("threads", args.threads))
            model, batch = setup(args, K, v.get("channels_last", False))
            chunk = v.get("chunk", auto_chunk[K])
            fold = loss_folding_K_into_vmap(K) if v.get("fold") else None
            fns = make_steps(model, batch, chunk, fold)
            del fns["naive loop"]
            if chunk is not None and chunk < args.batch:
                chunked = make_steps(model, batch, np_chunk_size=chunk)
                fns["chunked non-private"] = chunked["non-private"]
            t = time_interleaved(fns, args.repeats)
            cell = f"{t['DP step'] / t['non-private']:.2f}"
            if "chunked non-private" in t:
                cell += f" ({t['DP step'] / t['chunked non-private']:.2f})"
            cells.append(cell)
        torch.set_num_threads(args.threads)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.compile:
        compiled(args)


def compiled(args):
    """torch.compile on both sides: the vmap(grad) function, and the model for the plain step."""
    from torch.func import functional_call, grad, vmap
    print("\ntorch.compile (inductor, CPU): | K | compile s | DP / non-private, both compiled |")
    for K in args.ks:
        model, batch = setup(args, K)
        params = {k: p.detach() for k, p in model.named_parameters()}

        def loss_of_one(params, *example):
            stateless = lambda *inputs: functional_call(model, params, inputs)
            return dpsgd.edm_loss(stateless, *[t.unsqueeze(0) for t in example])[0]
        t0 = time.perf_counter()
        per_example = torch.compile(vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0)))
        fast_model = torch.compile(model)
        per_example(params, *batch)
        dpsgd.edm_loss(fast_model, *batch).mean().backward()
        compile_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(0)

        def dp():
            g = dpsgd.clip_per_example(per_example(params, *batch), 1.0)
            return dpsgd.add_dp_noise({k: v.sum(0) for k, v in g.items()}, 1.0, 1.0, gen)

        def non_private():
            model.zero_grad(set_to_none=True)
            dpsgd.edm_loss(fast_model, *batch).mean().backward()
        t = time_interleaved({"dp": dp, "np": non_private}, args.repeats)
        print(f"| {K} | {compile_s:.0f} | {t['dp'] / t['np']:.2f} "
              f"({1e3 * t['dp']:.0f} vs {1e3 * t['np']:.0f} ms) |", flush=True)


if __name__ == "__main__":
    main()
