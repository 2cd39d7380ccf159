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
