"""Shared test helpers: load a numbered script (``01_toy_diffusion.py`` is not an
importable module name) from its path, once per session. Importing runs only the
definitions: every script keeps its work behind ``if __name__ == "__main__"``."""
import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(stem):
    """Import ``ROOT/<stem>.py`` as module ``<stem>`` (cached in sys.modules)."""
    if stem in sys.modules:
        return sys.modules[stem]
    path = ROOT / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module  # registered first, so dataclasses and pickling can find it
    spec.loader.exec_module(module)
    return module


# Published accountant values, pinned once for chapters 03 and 04 (each chapter's tests use them).
# TF-Privacy's rdp_accountant_test: compute_rdp(q=0.1, noise_multiplier=2, steps=10, order=5)
# ~ 0.07737; dp_accounting 0.6.0 and Opacus 1.6.0 both give 0.07736968 (scratch venv): tolerance
# half a unit in its 8th digit.
PUBLISHED_RDP = dict(q=0.1, noise_multiplier=2.0, steps=10, order=5.0, value=0.07736968, rel=1e-6)
# Opacus' RDP accountant test: noise multiplier 1.5, q 0.04, 2250 steps, delta 1e-5, Opacus'
# default orders -> eps ~ 7.32911117143 (12 digits published; Opacus 1.6.0: 7.3291111714386545).
PUBLISHED_EPS = dict(q=0.04, noise_multiplier=1.5, steps=2250, delta=1e-5, value=7.32911117143,
                     rel=1e-9)


def exits_2(capsys, main, *argv):
    """main(argv) exits with status 2 and one line on stderr, no traceback: returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run on 2-core CI boxes shared with other jobs: one torch thread is the
    fastest there. Session-scoped, so module- and session-scoped fixtures (which
    train small models) get it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """Float64 tests set the default dtype; never let that leak into the next test."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def toy():
    return load_script("01_toy_diffusion")


@pytest.fixture(scope="session")
def dpsgd():
    return load_script("02_dpsgd_from_scratch")


@pytest.fixture(scope="session")
def accountant():
    return load_script("03_accountant")


@pytest.fixture(scope="session")
def dpdm():
    return load_script("04_dpdm_mnist")


# ---- tiny data for chapter 04 (the tests never read the real MNIST) ----------------------------
def write_idx(path, arr, gz=True):
    """An IDX file (the MNIST format): magic 0x0000 0x08 <ndim>, big-endian sizes, uint8 data."""
    import gzip
    import numpy as np
    arr = np.asarray(arr, np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return raw


def tiny_mnist(folder, n_train=96, n_test=20, seed=0, gz=True):
    """Four IDX files of 'digits' whose class is the position of a bright bar; the labels of
    the training set are written raw (uncompressed) to exercise both kinds of file."""
    import numpy as np
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 4 + 2 * c:10 + 2 * c, 6:22] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte{'.gz' if gz else ''}", x, gz=gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, gz=False)
    return folder
