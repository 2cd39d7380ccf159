"""Evaluation of 04_dpdm_mnist.py (issue 6): Frechet distance, the FID network's integrity
checks, downstream classifiers and their leak-free model selection, the CelebA loader.
No network: downloads are tested with file:// URLs to files the tests write."""
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


# ---- The FID network: pinned hash, refused before loading, clear offline error -------------
class _RunsCodeWhenUnpickled:
    """A pickle that, when loaded, creates a file: stands in for a malicious download."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _forbid_loaders(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an unverified file was handed to a loader")
    for module, name in [(torch.jit, "load"), (torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, forbidden)


def test_inception_with_wrong_hash_is_refused_without_unpickling(ev, tmp_path, monkeypatch):
    flag = tmp_path / "code_ran"
    payload = pickle.dumps(_RunsCodeWhenUnpickled(flag))
    (tmp_path / "inception-2015-12-05.pt").write_bytes(payload)
    _forbid_loaders(monkeypatch)
    with pytest.raises(RuntimeError, match="refusing to load") as err:
        ev.load_inception(cache_dir=tmp_path)
    assert ev.INCEPTION_SHA256 in str(err.value) and "Delete it" in str(err.value)
    assert not flag.exists()
    monkeypatch.undo()
    pickle.loads(payload)  # the payload really runs code when unpickled ...
    assert flag.exists()   # ... so its absence above means nothing unpickled it


def test_inception_download_with_wrong_hash_is_refused_and_not_kept(ev, tmp_path, monkeypatch):
    flag = tmp_path / "code_ran"
    source = tmp_path / "mirror" / "inception-2015-12-05.pt"
    source.parent.mkdir()
    source.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(flag)))
    monkeypatch.setattr(ev, "INCEPTION_URL", source.as_uri())
    _forbid_loaders(monkeypatch)
    with pytest.raises(RuntimeError, match="wrong sha256; refusing"):
        ev.load_inception(cache_dir=tmp_path / "cache")
    assert not flag.exists() and not any((tmp_path / "cache").glob("*"))


def test_inception_missing_offline_gives_instructions(ev, tmp_path, monkeypatch):
    url = (tmp_path / "no_such_mirror" / "inception-2015-12-05.pt").as_uri()
    monkeypatch.setattr(ev, "INCEPTION_URL", url)
    with pytest.raises(RuntimeError) as err:
        ev.load_inception(cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "FID needs" in msg and url in msg and ev.INCEPTION_SHA256 in msg
    assert str(tmp_path / "cache" / "inception-2015-12-05.pt") in msg
    assert not (tmp_path / "cache" / "inception-2015-12-05.pt").exists()


def test_inception_pin_is_the_published_one(ev):
    # sha256 of NVIDIA's TorchScript Inception as pinned in crowsonkb/k-diffusion,
    # k_diffusion/evaluation.py (InceptionV3FeatureExtractor), for this exact URL.
    assert ev.INCEPTION_SHA256 == "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
    assert ev.INCEPTION_URL.endswith("stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt")


class FakeInception(torch.nn.Module):
    """Stands in for the real network: same call convention, checks what it is fed."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3 and return_features
        x = x.float()
        return torch.cat([x.mean((2, 3)), x.flatten(1)[:, :5]], 1)


def test_fid_pipeline_downloads_verifies_caches_and_scores(ev, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "inception-2015-12-05.pt"
    mirror.parent.mkdir()
    torch.jit.save(torch.jit.script(FakeInception()), str(mirror))
    monkeypatch.setattr(ev, "INCEPTION_URL", mirror.as_uri())
    monkeypatch.setattr(ev, "INCEPTION_SHA256", hashlib.sha256(mirror.read_bytes()).hexdigest())
    detector = ev.load_inception(cache_dir=tmp_path / "cache")  # downloaded, verified, loaded
    assert (tmp_path / "cache" / "inception-2015-12-05.pt").read_bytes() == mirror.read_bytes()
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)  # grayscale, no channel axis
    stats = ev.reference_stats(real, tmp_path / "mnist_train.npz", detector=detector, batch_size=16)
    monkeypatch.setattr(ev, "load_inception", lambda *a, **k: pytest.fail("cache not used"))
    cached = ev.reference_stats(real, tmp_path / "mnist_train.npz")
    assert np.array_equal(stats[0], cached[0]) and np.array_equal(stats[1], cached[1])
    # features of gray images repeated to RGB have a rank-deficient covariance: the square roots
    # of its ~0 eigenvalues limit the accuracy to ~1e-9 relative to the trace
    assert abs(ev.compute_fid(real[:, None], stats, detector)) < 1e-8 * np.trace(stats[1])
    brighter = np.clip(real.astype(int) + 40, 0, 255).astype(np.uint8)
    assert ev.compute_fid(brighter, stats, detector) > 100
    with pytest.raises(ValueError, match="uint8"):
        ev.compute_fid(real.astype(np.float32), stats, detector)


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
    with pytest.raises(SystemExit, match="does not exist.*img_align_celeba.zip.*--data-dir"):
        ev.main(["--dataset", "celeba", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


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
    assert evaluation["sampler"]["sample_steps"] == 3 and "fid" not in evaluation
    assert "36 samples" in evaluation["downstream_protocol"]  # a tenth held out to choose the epoch
    assert sorted(evaluation["downstream"]) == ["cnn", "logreg", "mlp"]
    assert all(0 <= r["test_acc"] <= 1 and r["epochs"] == 1 for r in evaluation["downstream"].values())
    assert "eval_time_s" in metrics["not_covered_by_dp"] and "downstream" not in metrics["dp_release"]


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
