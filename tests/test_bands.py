"""Known-answer tests of prism_probe.bands (FFT and DCT band filters, exact splits)."""

import math

import numpy as np
import pytest
import scipy.fft
import torch

from prism_probe.bands import (
    MAX_RADIUS,
    band_gain,
    bandpass,
    highpass,
    keep_first_dct,
    lowpass,
    split_bands,
)
from prism_probe.spectra import SpectrumInputError, zigzag_order

GRIDS = [(16, 16), (15, 21), (32, 16), (9, 8)]


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def plane_wave(h, w, ky, kx):
    y = torch.arange(h, dtype=torch.float64)[:, None]
    x = torch.arange(w, dtype=torch.float64)[None, :]
    return torch.cos(2 * math.pi * (ky * y / h + kx * x / w)).expand(2, 3, h, w)


def dct_basis(h, w, u, v):
    y = torch.arange(h, dtype=torch.float64)[:, None]
    x = torch.arange(w, dtype=torch.float64)[None, :]
    wave_y = torch.cos(math.pi * u * (2 * y + 1) / (2 * h))
    return (wave_y * torch.cos(math.pi * v * (2 * x + 1) / (2 * w))).expand(2, 3, h, w)


def zigzag_rank(h, w):
    rank = torch.empty(h * w, dtype=torch.long)
    rank[zigzag_order(h, w)] = torch.arange(h * w)
    return rank.reshape(h, w)


# ---------------------------------------------------------------------------------------------
# Splits sum back to the input


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("domain,edges,transition", [
    ("fft", [0.125], 0.0), ("fft", [0.1, 0.25, 0.4], 0.0), ("fft", [0.1, 0.25, 0.4], 0.08),
    ("dct", [0.125], 0.0), ("dct", [0.05, 0.2], 0.1), ("zigzag", [1, 20, 50], 0.0),
])
def test_bands_sum_to_input(h, w, domain, edges, transition):
    x = randn(2, 5, h, w) + 3.0
    bands = split_bands(x, edges, domain, transition)
    assert len(bands) == len(edges) + 1
    assert torch.allclose(sum(bands), x, rtol=0, atol=1e-12)
    x32 = x.float()
    assert torch.allclose(sum(split_bands(x32, edges, domain, transition)), x32, atol=2e-5)


@pytest.mark.parametrize("h,w", GRIDS)
def test_ideal_fft_bands_are_band_passes_and_split_the_energy(h, w):
    x = randn(2, 4, h, w, seed=1)
    edges = [0.1, 0.25, 0.4]
    bands = split_bands(x, edges)
    expected = [lowpass(x, 0.1), bandpass(x, 0.1, 0.25), bandpass(x, 0.25, 0.4),
                highpass(x, 0.4)]
    for band, ref in zip(bands, expected):
        assert torch.allclose(band, ref, atol=1e-12)
    # Disjoint masks: energies add up (Parseval).
    energy = sum(b.square().sum() for b in bands)
    assert torch.allclose(energy, x.square().sum(), rtol=1e-12)


def test_zigzag_bands_hold_their_coefficient_chunks():
    h, w = 7, 12
    x = randn(2, 3, h, w, seed=2)
    edges = [1, 10, 40]
    rank = zigzag_rank(h, w)
    coef = torch.from_numpy(scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho"))
    for band, (lo, hi) in zip(split_bands(x, edges, "zigzag"), [(0, 1), (1, 10), (10, 40),
                                                                 (40, h * w)]):
        inside = (rank >= lo) & (rank < hi)
        band_coef = torch.from_numpy(scipy.fft.dctn(band.numpy(), axes=(-2, -1), norm="ortho"))
        assert torch.allclose(band_coef, coef * inside, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Identity and DC cases


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("domain", ["fft", "dct"])
def test_lowpass_at_corner_frequency_is_identity(h, w, domain):
    x = randn(2, 3, h, w, seed=3)
    assert torch.equal(lowpass(x, math.sqrt(2) * 0.5, domain), x)
    assert torch.equal(lowpass(x, 1.0, domain, transition=0.2), x)
    assert torch.equal(highpass(x, MAX_RADIUS, domain), torch.zeros_like(x))


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("domain", ["fft", "dct"])
def test_cutoff_zero_separates_the_channel_mean(h, w, domain):
    x = randn(2, 3, h, w, seed=4)
    mean = x.mean((-2, -1), keepdim=True)
    assert torch.allclose(lowpass(x, 0.0, domain), mean.expand_as(x), atol=1e-12)
    assert torch.allclose(highpass(x, 0.0, domain), x - mean, atol=1e-12)


def test_corner_cell_is_blocked_just_below_the_corner_frequency():
    x = plane_wave(16, 16, 8, 8)  # the (0.5, 0.5) cell, |f| = sqrt(2)/2
    assert lowpass(x, MAX_RADIUS - 1e-3).abs().max() < 1e-12
    assert torch.allclose(lowpass(x, MAX_RADIUS), x)


# ---------------------------------------------------------------------------------------------
# Plane waves pass or are blocked at the right cutoff


@pytest.mark.parametrize("h,w,ky,kx", [(16, 16, 3, 2), (15, 21, 4, -6), (32, 16, 10, 3),
                                       (9, 8, 0, 4)])
def test_fft_plane_wave_passes_and_blocks_at_its_frequency(h, w, ky, kx):
    x = plane_wave(h, w, ky, kx)
    f = math.hypot(ky / h, kx / w)
    assert torch.allclose(lowpass(x, f), x, atol=1e-12)  # inclusive cutoff
    assert torch.allclose(lowpass(x, f + 0.01), x, atol=1e-12)
    assert lowpass(x, f - 0.01).abs().max() < 1e-12
    assert torch.allclose(highpass(x, f - 0.01), x, atol=1e-12)
    assert highpass(x, f).abs().max() < 1e-12
    assert torch.allclose(bandpass(x, f - 0.01, f + 0.01), x, atol=1e-12)
    assert bandpass(x, f + 0.01, f + 0.1).abs().max() < 1e-12
    # Raised-cosine edge centred on the cutoff: half the amplitude passes.
    assert torch.allclose(lowpass(x, f, transition=0.1), 0.5 * x, atol=1e-12)
    assert torch.allclose(highpass(x, f, transition=0.1), 0.5 * x, atol=1e-12)


@pytest.mark.parametrize("h,w,u,v", [(16, 16, 3, 5), (15, 21, 7, 2), (8, 20, 0, 9)])
def test_dct_basis_passes_and_blocks_at_u_over_2h(h, w, u, v):
    x = dct_basis(h, w, u, v)
    f = math.hypot(u / (2 * h), v / (2 * w))
    assert torch.allclose(lowpass(x, f, "dct"), x, atol=1e-12)
    assert lowpass(x, f - 0.005, "dct").abs().max() < 1e-12
    assert torch.allclose(highpass(x, f - 0.005, "dct"), x, atol=1e-12)
    assert torch.allclose(lowpass(x, f, "dct", transition=0.05), 0.5 * x, atol=1e-12)


def test_dct_cutoff_keeps_coefficients_by_radius():
    h, w, cutoff = 10, 24, 0.2
    x = randn(2, 3, h, w, seed=5)
    out = lowpass(x, cutoff, "dct")
    coef = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho")
    radius = np.hypot(np.arange(h)[:, None] / (2 * h), np.arange(w)[None, :] / (2 * w))
    expected = scipy.fft.idctn(coef * (radius <= cutoff), axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_raised_cosine_gain_profile():
    gain = band_gain(32, 32, None, 0.25, "fft", transition=0.1, dtype=torch.float64)
    radius = np.hypot(np.fft.fftfreq(32)[:, None], np.arange(17)[None, :] / 32)
    g = gain.numpy()
    assert np.all(g[radius <= 0.2] == 1.0) and np.all(g[radius >= 0.3] == 0.0)
    np.testing.assert_allclose(g[np.isclose(radius, 0.25)], 0.5)  # cell (0, 8)
    inside = (radius > 0.2) & (radius < 0.3)
    np.testing.assert_allclose(g[inside], 0.5 * (1 + np.cos(np.pi * (radius[inside] - 0.2) / 0.1)))


# ---------------------------------------------------------------------------------------------
# keep_first_dct


def test_keep_first_dct_counts_and_per_sample_k():
    h, w = 6, 9
    x = randn(4, 2, h, w, seed=6)
    assert torch.allclose(keep_first_dct(x, h * w), x, atol=1e-12)
    assert torch.equal(keep_first_dct(x, 0), torch.zeros_like(x))
    assert torch.allclose(keep_first_dct(x, 1), x.mean((-2, -1), keepdim=True).expand_as(x),
                          atol=1e-12)
    k = torch.tensor([0, 5, 17, 54])
    out = keep_first_dct(x, k)
    coef = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho")
    rank = zigzag_rank(h, w).numpy()
    for i in range(4):
        expected = scipy.fft.idctn(coef[i] * (rank < int(k[i])), axes=(-2, -1), norm="ortho")
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Dtypes, gradients, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_and_out(dtype):
    x = randn(1, 2, 8, 8, seed=7, dtype=torch.float32).to(dtype)
    out = lowpass(x, 0.2)
    assert out.dtype == dtype
    assert torch.equal(out, lowpass(x.float(), 0.2).to(dtype))
    assert sum(b.float() for b in split_bands(x, [0.2])).sub(x.float()).abs().max() < 0.05


def test_filters_are_differentiable():
    x = randn(1, 1, 8, 8, seed=8).requires_grad_()
    lowpass(x, 0.1).sum().backward()
    # The ideal FFT low-pass is self-adjoint and passes constants: d sum / dx = 1.
    assert torch.allclose(x.grad, torch.ones_like(x), atol=1e-12)


def test_invalid_arguments_raise_one_line_errors():
    x = randn(1, 1, 8, 8)
    cases = [
        (lambda: lowpass(x, 0.2, domain="wavelet"), "domain='wavelet' is unknown"),
        (lambda: lowpass(x, -0.1), "cutoff=-0.1 must be a number >= 0"),
        (lambda: bandpass(x, 0.3, 0.2), "pass lo < hi"),
        (lambda: split_bands(x, [0.3, 0.1]), "strictly increasing"),
        (lambda: split_bands(x, [0.5], "zigzag"), "integer coefficient counts"),
        (lambda: split_bands(x, [4], "zigzag", transition=0.1), "transition must be 0"),
        (lambda: keep_first_dct(x, 65), "0..64"),
        (lambda: keep_first_dct(x, torch.tensor([1.5])), "LongTensor"),
        (lambda: lowpass(torch.zeros(8, 8), 0.2), "(B, C, h, w)"),
        (lambda: lowpass(x, 0.2, transition=-1), "transition"),
    ]
    for call, words in cases:
        with pytest.raises(SpectrumInputError) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value)
