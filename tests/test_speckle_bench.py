"""benchmarks/speckle.py: its two measurements against cases with a known answer."""
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sp():
    spec = importlib.util.spec_from_file_location("speckle_bench", ROOT / "benchmarks" / "speckle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["speckle_bench"] = module
    spec.loader.exec_module(module)
    return module


def images(n=200):
    x0 = -torch.ones(n, 1, 28, 28)
    x0[:, :, 8:20, 12:16] = 1.0  # a bar on a background of -1
    return x0, torch.arange(n) % 10


def test_a_denoiser_that_returns_its_input_leaves_all_the_noise(sp):
    x0, y = images()
    rms, corr = sp.background_error(lambda x, s, y: x, x0, y, 0.5)
    assert rms == pytest.approx(0.5, rel=0.01) and corr == pytest.approx(1.0)


def test_an_exact_denoiser_leaves_none(sp):
    x0, y = images()
    rms, _ = sp.background_error(lambda x, s, y: x0, x0, y, 0.5)
    assert rms == 0.0


def test_only_background_pixels_count(sp):
    """Exact on the background and wrong on the bar: no error; the reverse: all the noise."""
    x0, y = images()
    background = x0 == -1
    rms, _ = sp.background_error(lambda x, s, y: torch.where(background, x0, x), x0, y, 0.5)
    assert rms == 0.0
    rms, _ = sp.background_error(lambda x, s, y: torch.where(background, x, x0), x0, y, 0.5)
    assert rms == pytest.approx(0.5, rel=0.01)


def test_sample_stats_count_dim_pixels_and_top_rows(sp):
    x = np.zeros((4, 28, 28), np.uint8)
    x[:, 0, :7] = 40     # a quarter of the first row: dim speckle
    x[:, 10, :] = 255    # a stroke: not speckle
    share, p75, p90, p99 = sp.sample_stats(x)
    assert share == pytest.approx(7 / 784)
    assert (p75, p90) == (0, 0) and p99 == pytest.approx(40)
