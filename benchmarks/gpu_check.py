"""One prepared GPU check for 04_dpdm_mnist.py: does it work on CUDA, and how fast is it?

GPU time is rare and short, so this is one script that fits in about 8 minutes on one GPU:
  1. device, torch and CUDA versions;
  2. the `smoke` preset end to end on the device, as a user runs it: train, Ctrl-C after a few
     steps, --resume, then --eval-only from the releasable model file; the reported eps is
     checked against the accountant;
  3. the DP step of the `paper` and `gpu` presets at their real batch (expected 4,000) and K:
     time per physical chunk (median of a few, after warm-up, with synchronize) for several
     chunk sizes, bf16 autocast on and off, against a non-private step of the same model on
     the same images; peak memory; one whole logical step to check the extrapolation; the
     sampler's time per denoiser call; and from those the projected wall time of both presets;
  4. a short real training with the `cpu` preset on the device (MNIST when --data-dir has it,
     else synthetic images, said so) and its classifier accuracies.
Every number goes into OUT/gpu_check.json and a short OUT/gpu_check.md, with its unit.

  python benchmarks/gpu_check.py --data-dir data/mnist --out OUT        # on a GPU machine
  python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check   # toy sizes, CPU, < 5 min
"""
import argparse
import importlib.util
import json
import math
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "04_dpdm_mnist.py"


def load_04():
    spec = importlib.util.spec_from_file_location("dpdm04", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpdm04"] = module
    spec.loader.exec_module(module)
    return module


m = load_04()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes (the whole check on CPU in < 5 min)")
    p.add_argument("--out", default="out/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--data-dir", help="the four MNIST IDX files; without them synthetic images are used")
    p.add_argument("--budget-min", type=float, default=8.0, help="skip what would not fit (minutes)")
    return p.parse_args(argv)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ----------------------------------------------------------------------------- 1. versions
def versions(device):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


# ----------------------------------------------------------------------------- 2. smoke end to end
def synthetic_mnist(folder, n_train=2000, n_test=500):
    """IDX files of 'digits' whose class is the position of a bright bar (no real data needed)."""
    import gzip
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 4 + 2 * c:10 + 2 * c, 6:22] = 255
        for kind, arr in (("images-idx3", x), ("labels-idx1", y.astype(np.uint8))):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    return folder


def run_04(*argv, interrupt_after=None, timeout=600):
    """Run 04 as a user does; with interrupt_after=k, press Ctrl-C after its k-th step line."""
    cmd = [sys.executable, str(SCRIPT), *map(str, argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if interrupt_after and sum(x.startswith("step") for x in lines) == interrupt_after:
            proc.send_signal(signal.SIGINT)
            interrupt_after = None
    err = proc.communicate(timeout=timeout)[1]
    return proc.returncode, "".join(lines), err


def smoke_end_to_end(device, data, unverified, out, quick):
    """Train (interrupted), resume, evaluate from the model file; check eps."""
    epochs = 0.5 if quick else 0.02  # tiny data: 8 steps, real MNIST: 38 steps
    common = ["--preset", "smoke", "--device", device, "--data-dir", data, "--out", out, "--epochs", epochs,
              *(["--unverified"] if unverified else [])]
    t0 = time.time()
    rc1, _, err1 = run_04(*common, "--log-every", 1, interrupt_after=3)
    rc2, log2, err2 = run_04(*common, "--resume")
    rc3, log3, err3 = run_04("--eval-only", "--ckpt", out / "model.pt", "--device", device, "--data-dir", data,
                             "--eval-epochs", 1, "--num-samples", 200, *(["--unverified"] if unverified else []))
    r = json.loads((out / "metrics.json").read_text())["dp_release"] if rc2 == 0 else {}
    eps = m.epsilon_rdp(r["q"], r["noise_multiplier"], r["steps"], r["delta"]) if r else None
    ok = (rc1 == 130 and "Continue with" in err1 and rc2 == 0 and "resumed at step" in log2 and rc3 == 0
          and r.get("steps") == r.get("total_steps") and eps is not None
          and abs(eps - r["eps_spent"]) < 1e-9 and r["eps_spent"] <= r["eps_target"])
    return {"ok": ok, "seconds": round(time.time() - t0, 1), "interrupt_exit_code": rc1,
            "resume_exit_code": rc2, "eval_only_exit_code": rc3, "steps": r.get("steps"),
            "eps_reported": r.get("eps_spent"), "eps_recomputed": eps, "eps_target": r.get("eps_target"),
            "errors": "" if ok else (err1 + err2 + err3)[-2000:]}


# ----------------------------------------------------------------------------- 3. DP step timing
def step_parts(preset, device, quick):
    """The preset's model, a batch of its expected size with its randomness drawn, the loss."""
    cfg = m.Config(**{**m.PRESETS[preset].config, **({"channels": 8, "mults": (1, 2), "blocks": 1, "K": 2}
                                                      if quick else {})})
    torch.manual_seed(0)
    model = m.build_denoiser(cfg).to(device)
    b = 16 if quick else round(60_000 / math.ceil(60_000 / cfg.batch))  # the expected batch qN (4,000)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.rand(b, 1, 28, 28, device=device) * 2 - 1
    batch = m.batch_randomness(x, torch.arange(b, device=device) % 10, cfg, 10, gen)
    loss_fn = lambda net, *t: m.dpdm_loss(net, *t, sigma_data=model.sigma_data)
    return cfg, model, batch, loss_fn


def time_preset(preset, device, quick, chunks, deadline):
    """Seconds per chunk of the DP step (private_gradient's per-example work) and of a
    non-private step on the same images, for each chunk size and with bf16 on/off."""
    cfg, model, batch, loss_fn = step_parts(preset, device, quick)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    b, rows = len(batch[0]), []
    for bf16 in ([True, False] if device.startswith("cuda") else [False]):
        m.BF16_ON_GPU = bf16
        for chunk in chunks:
            if time.time() > deadline:
                rows.append({"chunk": chunk, "bf16": bf16, "skipped": "time budget"})
                continue
            part = [t[:chunk] for t in batch]
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            dp = timed(lambda: m.private_gradient(model, loss_fn, *part, C=cfg.clip, noise_multiplier=1.0,
                                                  expected_batch_size=b, generator=torch.Generator(device)),
                       device, 3)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None

            def plain_step():  # the same images, one backward pass for the whole chunk
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(model, *part).mean()
                opt.zero_grad()
                loss.backward()
            nonpriv = timed(plain_step, device, 3)
            n_chunks = math.ceil(b / chunk)
            rows.append({"chunk": chunk, "bf16": bf16, "dp_s_per_chunk": dp, "nonprivate_s_per_chunk": nonpriv,
                         "dp_over_nonprivate": dp / nonpriv, "dp_s_per_step": dp * n_chunks,
                         "nonprivate_s_per_step": nonpriv * n_chunks, "peak_memory_gib": peak})
            print(f"  {preset}: chunk {chunk:4d}, bf16 {bf16!s:5}: DP {dp * n_chunks:8.2f} s/step "
                  f"({dp / nonpriv:.2f}x non-private), peak {peak or 0:.1f} GiB", flush=True)
    m.BF16_ON_GPU = True
    done = [r for r in rows if "dp_s_per_step" in r]
    best = min(done, key=lambda r: r["dp_s_per_step"]) if done else None
    whole = None
    if best and time.time() < deadline:  # one whole logical step at the best setting, to check
        m.BF16_ON_GPU = best["bf16"]
        whole = timed(lambda: m.dp_sgd_step(model, opt, loss_fn, *batch, C=cfg.clip, noise_multiplier=1.0,
                                            expected_batch_size=b, generator=torch.Generator(device),
                                            chunk_size=best["chunk"]), device, 1)
        m.BF16_ON_GPU = True
    return {"preset": preset, "batch": b, "K": cfg.K, "params": sum(p.numel() for p in model.parameters()),
            "rows": rows, "best": best, "whole_step_s": whole}


def time_sampler(device, quick):
    """Seconds per denoiser call (one NFE) on 1,000 images of the paper's model."""
    cfg = m.Config(**({"channels": 8, "mults": (1, 2), "blocks": 1} if quick else {}))
    model = m.build_denoiser(cfg).to(device).eval()
    n = 50 if quick else 1000
    x, y = torch.randn(n, 1, 28, 28, device=device), torch.arange(n, device=device) % 10
    with torch.no_grad():
        s = timed(lambda: model(x, torch.ones(n, device=device), y), device, 3)
    return {"images": n, "s_per_nfe": s}


def projections(timings, sampler):
    """Projected wall time of the gpu and paper presets on this device (one process)."""
    out = {}
    for t in timings:
        if not t["best"]:
            continue
        q_steps = {"paper": 4500, "gpu": 900}.get(t["preset"], 0)
        step_s = t["whole_step_s"] or t["best"]["dp_s_per_step"]
        # sampling: the paper's Acc setting = 1000 churn steps = 1999 denoiser calls per image
        # batch; 60k + 10k images for the paper, 10k with 50 DDIM steps for gpu
        nfe, images = (1999, 70_000) if t["preset"] == "paper" else (50, 10_000)
        sample_s = sampler["s_per_nfe"] * nfe * images / sampler["images"]
        out[t["preset"]] = {"train_h": q_steps * step_s / 3600, "sample_h": sample_s / 3600,
                            "step_s": step_s, "steps": q_steps}
    return out


# ----------------------------------------------------------------------------- 4. a short real training
def short_training(device, data, unverified, out, quick):
    argv = ["--preset", "smoke" if quick else "cpu", "--device", device, "--data-dir", data, "--out", out,
            "--eval", *(["--unverified"] if unverified else [])]
    t0 = time.time()
    rc, log, err = run_04(*argv, timeout=1800)
    res = {"preset": "smoke" if quick else "cpu", "exit_code": rc, "seconds": round(time.time() - t0, 1)}
    if rc == 0:
        mt = json.loads((out / "metrics.json").read_text())
        res.update({k: round(v["test_acc"] * 100, 1) for k, v in mt["evaluation"].get("downstream", {}).items()})
        res.update(eps=mt["dp_release"]["eps_spent"], train_s=mt["not_covered_by_dp"]["train_s"],
                   sample_s=mt["not_covered_by_dp"]["sample_s"])
    else:
        res["errors"] = err[-2000:]
    return res


def report_md(r):
    lines = ["# GPU check of 04_dpdm_mnist.py", "", f"{r['versions']}", "", f"data: {r['data']}", ""]
    if r["quick"]:
        lines += ["quick mode: toy sizes; the numbers check the script and project nothing.", ""]
    lines += [
             f"## smoke end to end: {'OK' if r['smoke']['ok'] else 'FAILED'} ({r['smoke']['seconds']} s; "
             f"eps {r['smoke']['eps_reported']} reported, {r['smoke']['eps_recomputed']} recomputed)", "",
             "## DP step", "", "| preset | chunk | bf16 | DP s/step | non-private s/step | ratio | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for t in r["timings"]:
        for row in t["rows"]:
            if "dp_s_per_step" in row:
                lines.append(f"| {t['preset']} | {row['chunk']} | {row['bf16']} | {row['dp_s_per_step']:.3f} | "
                             f"{row['nonprivate_s_per_step']:.3f} | {row['dp_over_nonprivate']:.2f} | "
                             f"{row['peak_memory_gib'] or 0:.1f} |")
        lines.append(f"| {t['preset']} | whole step at the best chunk | | {t['whole_step_s'] or float('nan'):.3f} s | | | |")
    lines += ["", f"sampler: {r['sampler']['s_per_nfe'] * 1000:.2f} ms per denoiser call on "
              f"{r['sampler']['images']} images", "", "## projected wall time (one GPU)", ""]
    for name, p in r["projections"].items():
        lines.append(f"- {name}: {p['steps']} steps x {p['step_s']:.2f} s = {p['train_h']:.2f} h training "
                     f"+ {p['sample_h']:.2f} h sampling")
    t = r["training"]
    lines += ["", f"## short training ({t['preset']} preset on this device): exit {t['exit_code']}, {t['seconds']} s",
              "", ", ".join(f"{k} {t[k]} %" for k in ("logreg", "mlp", "cnn") if k in t),
              "", f"total {r['total_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out, t_start = Path(args.out), time.time()
    deadline = t_start + 60 * args.budget_min
    out.mkdir(parents=True, exist_ok=True)
    real = args.data_dir and all(any((Path(args.data_dir) / (n + s)).exists() for s in ("", ".gz"))
                                 for n in m.IDX_FILES)
    data = Path(args.data_dir) if real else synthetic_mnist(out / "synthetic_data",
                                                            *((200, 50) if args.quick else (2000, 500)))
    r = {"versions": versions(args.device), "quick": args.quick,
         "data": "MNIST" if real else "synthetic images (no MNIST files in --data-dir)"}
    print(f"[1] {r['versions']}\n    data: {r['data']}", flush=True)
    print("[2] smoke preset end to end (train, Ctrl-C, --resume, --eval-only)", flush=True)
    r["smoke"] = smoke_end_to_end(args.device, data, not real, out / "smoke", args.quick)
    print(f"    {'OK' if r['smoke']['ok'] else 'FAILED'}: {r['smoke']}", flush=True)
    print("[3] DP step of the paper and gpu presets", flush=True)
    chunks = {"paper": [4, 8] if args.quick else [16, 32, 64], "gpu": [4, 8] if args.quick else [128, 256, 512]}
    step_deadline = t_start + 60 * args.budget_min * 0.6
    r["timings"] = [time_preset(p, args.device, args.quick, chunks[p], step_deadline) for p in ("paper", "gpu")]
    r["sampler"] = time_sampler(args.device, args.quick)
    r["projections"] = projections(r["timings"], r["sampler"])
    for name, p in r["projections"].items():
        print(f"    projected {name}: {p['train_h']:.2f} h training + {p['sample_h']:.2f} h sampling", flush=True)
    print("[4] a short real training", flush=True)
    if time.time() < deadline:
        r["training"] = short_training(args.device, data, not real, out / "training", args.quick)
    else:
        r["training"] = {"preset": "cpu", "exit_code": None, "seconds": 0, "skipped": "time budget"}
    print(f"    {r['training']}", flush=True)
    r["total_s"] = time.time() - t_start
    (out / "gpu_check.json").write_text(json.dumps(r, indent=2, default=str))
    (out / "gpu_check.md").write_text(report_md(r))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({r['total_s']:.0f} s)")
    return 0 if r["smoke"]["ok"] and r["training"].get("exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
