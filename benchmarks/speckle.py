"""Where the speckle of the laptop run's samples comes from: the denoiser's error on background.

    python benchmarks/speckle.py --ckpt RUN/model.pt [RUN2/model.pt ...] --data-dir DIR
    python benchmarks/speckle.py --samples RUN/samples.npz [...] --data-dir DIR

--ckpt: for --n real test images x0 and each noise level sigma, the RMS of D(x0 + sigma n; sigma)
- x0 over the background pixels (x0 = -1: value 0, as in every MNIST background), beside sigma
(the error of returning the noisy input) and the correlation of the error with the noise n. An
exact denoiser is nearly exact there; whatever error it leaves at sigma ~ 0.2-1 the sampler's last
steps carry into the sample, since below that D barely changes its input (c_skip ~ 1).
--samples: the share of pixels with a value in (0, 64) and percentiles of the top three rows
(background in nearly every digit), beside the same numbers of the real test images.
The test images are read outside the DP mechanism: these numbers are outside the guarantee.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.03, 0.1, 0.2, 0.5, 1.0, 2.0)


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


m = load("dpdm04", ROOT / "04_dpdm_mnist.py")


@torch.no_grad()
def background_error(denoiser, x0, y, sigma, seed=0):
    """(RMS error over background pixels, correlation of that error with the noise)."""
    n = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    error = denoiser(x0 + sigma * n, torch.full((len(x0),), sigma), y) - x0
    background = x0 == -1
    e, z = error[background], n[background]
    return e.pow(2).mean().sqrt().item(), torch.corrcoef(torch.stack([e, z]))[0, 1].item()


def sample_stats(images):
    """Share of pixels in (0, 64); 75th/90th/99th percentile of the top three rows."""
    x = np.asarray(images).astype(int)
    top = x[:, :3].ravel()
    return ((x > 0) & (x < 64)).mean(), *np.percentile(top, [75, 90, 99])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", nargs="*", default=[], help="model.pt files of 04")
    p.add_argument("--samples", nargs="*", default=[], help="samples.npz files of 04")
    p.add_argument("--data-dir", required=True, help="MNIST's four IDX files")
    p.add_argument("--n", type=int, default=500, help="test images for --ckpt [default: 500]")
    args = p.parse_args()
    test_x, test_y = m.load_data("mnist", args.data_dir)["test"]
    if args.ckpt:
        print("| model | " + " | ".join(f"sigma {s}: RMS (corr with n)" for s in SIGMAS) + " |")
        print("|---|" + "---|" * len(SIGMAS))
    for path in args.ckpt:
        _, denoiser, _, _ = m.load_model_file(path, "cpu")
        cells = [background_error(denoiser.eval(), test_x[:args.n], test_y[:args.n], s)
                 for s in SIGMAS]
        print(f"| {path} | " + " | ".join(f"{r:.3f} ({c:.2f})" for r, c in cells) + " |")
    if args.samples:
        real = ((test_x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
        print("| images | pixels in (0, 64) | top rows: 75th / 90th / 99th percentile |")
        print("|---|---|---|")
        for name, images in [("real test images", real)] + [
                (path, np.load(path)["x"]) for path in args.samples]:
            share, *pct = sample_stats(images)
            print(f"| {name} | {share:.3f} | {' / '.join(f'{v:.0f}' for v in pct)} |")


if __name__ == "__main__":
    main()
