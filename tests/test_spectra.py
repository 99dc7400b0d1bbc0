"""Known-answer tests of prism_probe.spectra (radial spectra, DCT bands, Δ log amplitude)."""

import json
import math

import numpy as np
import pytest
import scipy.fft
import torch

from prism_probe.spectra import (
    SpectrumAccumulator,
    SpectrumConfig,
    SpectrumInputError,
    dct2,
    dct_band_energy,
    dct_band_index,
    dct_band_sizes,
    dct_matrix,
    delta_log_amplitude,
    diagonal_frequencies,
    hann_window,
    idct2,
    loglog_slope,
    low_band_share,
    normalize_band_energy,
    radial_frequencies,
    radial_power_spectrum,
    spectral_centroid,
    zigzag_order,
)

RAW = SpectrumConfig(window=None, remove_mean=False)

# libjpeg's natural order of the 8x8 zig-zag scan.
JPEG_ZIGZAG = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
]


def plane_wave(h, w, ky, kx, dtype=torch.float64):
    y = torch.arange(h, dtype=dtype)[:, None]
    x = torch.arange(w, dtype=dtype)[None, :]
    return torch.cos(2 * math.pi * (ky * y / h + kx * x / w))


def gaussian_field(rng, n_images, size, alpha, parent):
    """Crops of periodic Gaussian random fields with power ∝ |f|**-alpha (not periodic
    themselves, like real feature maps)."""
    f = np.hypot(np.fft.fftfreq(parent)[:, None], np.fft.fftfreq(parent)[None, :])
    amp = np.zeros_like(f)
    amp[f > 0] = f[f > 0] ** (-alpha / 2)
    noise = rng.standard_normal((n_images, parent, parent))
    field = np.fft.ifft2(np.fft.fft2(noise) * amp).real
    return torch.from_numpy(field[:, None, :size, :size].copy())


# ---------------------------------------------------------------------------------------------
# Radial power spectrum


@pytest.mark.parametrize("window", [None, "hann"])
def test_white_noise_is_flat_at_its_variance(window):
    gen = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(64, 8, 32, 16, generator=gen, dtype=torch.float64)
    spec = radial_power_spectrum(x, SpectrumConfig(window=window, remove_mean=False))
    mean = spec.power.mean(0)
    # Each ring mean averages ~count/2 independent |F|^2 ~ 9 * Exp(1) per channel and image.
    stderr = 9.0 / torch.sqrt(spec.counts / 2 * 64 * 8)
    assert torch.all((mean - 9.0).abs() < 5 * stderr)


def test_white_noise_low_band_share_is_share_of_cells():
    gen = torch.Generator().manual_seed(1)
    h, w = 24, 40
    x = torch.randn(400, 4, h, w, generator=gen, dtype=torch.float64)
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    for cutoff in (0.125, 0.25):
        spec = radial_power_spectrum(x, SpectrumConfig(window=None, remove_mean=False,
                                                       low_cutoff=cutoff))
        share = low_band_share(spec)
        expected = np.mean(f <= cutoff)
        sem = share.std() / math.sqrt(len(share))
        assert abs(share.mean().item() - expected) < 4 * sem.item()


@pytest.mark.parametrize("h,w,ky,kx", [
    (32, 16, 3, 2), (32, 16, 16, 0), (32, 16, -5, 7), (16, 32, 0, 16),
    (15, 21, 4, 6), (15, 21, -7, 10), (16, 16, 5, 3), (15, 15, 7, 7), (9, 8, 2, 4),
])
@pytest.mark.parametrize("config", [RAW, SpectrumConfig(window=None, remove_mean=True)])
def test_plane_wave_power_lands_in_its_ring(h, w, ky, kx, config):
    x = plane_wave(h, w, ky, kx).expand(2, 3, h, w)
    spec = radial_power_spectrum(x, config)
    f = math.hypot(ky / h, kx / w)
    ring_power = spec.power * spec.counts
    total = x.square().sum((-2, -1)).mean(1)
    assert torch.allclose(spec.total_power, total, rtol=1e-12)
    if f > 0.5:
        assert torch.allclose(spec.corner_power, total, rtol=1e-12)
        return
    # The ring whose centre k / max(h, w) is nearest to |f| (no grid here has a tie).
    k = int(np.argmin(np.abs(spec.freqs.numpy() - f)))
    assert torch.allclose(ring_power[:, k], total, rtol=1e-12)
    assert torch.allclose(spectral_centroid(spec), torch.full((2,), f, dtype=torch.float64))


def test_plane_wave_beyond_nyquist_disc_goes_to_the_corner():
    x = plane_wave(16, 16, 8, 8)[None, None]  # |f| = 0.707
    spec = radial_power_spectrum(x, RAW)
    assert spec.power.abs().max() < 1e-20
    assert torch.allclose(spec.corner_power, spec.total_power)
    assert spec.corner_count == 16 * 16 - int(spec.counts.sum())


def test_ring_edges_and_centres_in_cycles_per_cell():
    bins, centers, in_ring = radial_frequencies(15, 21)
    assert bins.shape == (15, 11) and torch.equal(in_ring, bins < len(centers))
    assert torch.allclose(centers, torch.arange(11, dtype=torch.float64) / 21)
    full, _, _ = radial_frequencies(15, 21, half=False)
    f = np.hypot(np.fft.fftfreq(15)[:, None], np.fft.fftfreq(21)[None, :])
    expected = np.where(f <= 0.5, np.ceil(f * 21 - 0.5), 11)
    assert np.array_equal(full.numpy(), expected)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_power_law_slope_is_recovered_with_hann_window(alpha):
    # 64x64 crops of 256x256 fields: without a window the crop edges leak power ∝ f^-2 and
    # flatten steep spectra; the default Hann window with mean removal recovers -alpha.
    x = gaussian_field(np.random.default_rng(0), 8, 64, alpha, parent=256)
    config = SpectrumConfig()
    spec = radial_power_spectrum(x, config)
    slope = loglog_slope(spec.freqs, spec.power.mean(0, keepdim=True), *config.slope_range)
    assert abs(slope.item() + alpha) < 0.1


def test_edge_leakage_flattens_steep_spectrum_without_window():
    x = gaussian_field(np.random.default_rng(0), 8, 64, 3.0, parent=256)
    spec = radial_power_spectrum(x, SpectrumConfig(window=None))
    slope = loglog_slope(spec.freqs, spec.power.mean(0, keepdim=True), 0.05, 0.4)
    assert slope.item() > -2.9


def test_loglog_slope_of_exact_power_law():
    freqs = torch.arange(1, 17, dtype=torch.float64) / 32
    power = torch.stack([freqs**-1.5, 7 * freqs**-2.5])
    slope = loglog_slope(freqs, power, 0.05, 0.4)
    assert torch.allclose(slope, torch.tensor([-1.5, -2.5], dtype=torch.float64))


@pytest.mark.parametrize("h,w", [(32, 16), (15, 21), (7, 7), (1, 8), (2, 5)])
def test_parseval_without_window_and_mean_removal(h, w):
    x = torch.randn(3, 5, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    spec = radial_power_spectrum(x, RAW)
    energy = x.square().sum((-2, -1)).mean(1)
    parts = (spec.power * spec.counts).sum(1) + spec.corner_power
    assert torch.allclose(parts, energy, rtol=1e-13, atol=0)
    assert torch.allclose(spec.total_power, energy, rtol=1e-13, atol=0)
    assert int(spec.counts.sum()) + spec.corner_count == h * w


@pytest.mark.parametrize("n", [8, 9, 16, 15])
def test_index_binning_matches_pysteps_rapsd(n):
    rapsd = pytest.importorskip("pysteps.utils.spectral").rapsd
    x = torch.randn(2, 3, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    spec = radial_power_spectrum(x, SpectrumConfig(window=None, remove_mean=False,
                                                   binning="index"))
    ref = np.array([[rapsd(x[b, c].numpy(), fft_method=np.fft) for c in range(3)]
                    for b in range(2)]).mean(1)
    assert spec.power.shape == ref.shape
    np.testing.assert_allclose(spec.power.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(spec.freqs.numpy(), np.fft.fftfreq(n)[: ref.shape[1]])


def test_hann_window_is_symmetric_and_separable():
    win = hann_window(5, 7, dtype=torch.float64)
    assert torch.allclose(win[:, 3], torch.tensor([0, 0.5, 1, 0.5, 0], dtype=torch.float64))
    assert torch.allclose(win, win.flip(0)) and torch.allclose(win, win.flip(1))
    assert torch.allclose(hann_window(1, 4)[0], torch.tensor([0.0, 0.75, 0.75, 0.0]))


# ---------------------------------------------------------------------------------------------
# DCT


@pytest.mark.parametrize("h,w", [(8, 8), (7, 12), (16, 5)])
def test_dct2_matches_scipy_and_round_trips(h, w):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    coef = dct2(x)
    ref = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(coef.numpy(), ref, atol=1e-12)
    assert torch.allclose(idct2(coef), x, atol=1e-12)
    d = dct_matrix(h, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(h, dtype=torch.float64), atol=1e-13)


def test_zigzag_order_is_jpeg_for_8x8():
    assert zigzag_order(8, 8).tolist() == JPEG_ZIGZAG


def test_zigzag_order_for_rectangular_grid():
    # 2x3: diagonals (0,0) | (0,1),(1,0) | (1,1),(0,2) | (1,2)
    assert zigzag_order(2, 3).tolist() == [0, 1, 3, 4, 2, 5]
    order = zigzag_order(5, 9)
    assert sorted(order.tolist()) == list(range(45))
    diag = (order // 9) + (order % 9)
    assert torch.all(diag[1:] >= diag[:-1])


@pytest.mark.parametrize("n,k", [(256, 10), (45, 7), (10, 10), (17, 1)])
def test_dct_bands_chunk_like_numpy_array_split(n, k):
    assert dct_band_sizes(n, k) == [len(c) for c in np.array_split(np.arange(n), k)]


def test_dct_band_index_follows_zigzag_chunks():
    band = dct_band_index(5, 9, 7).reshape(-1)
    order = zigzag_order(5, 9)
    chunks = np.array_split(order.numpy(), 7)
    for k, chunk in enumerate(chunks):
        assert torch.all(band[torch.from_numpy(chunk)] == k)


def test_dct_band_energy_of_white_noise_follows_chunk_sizes():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 16, 16, 16, generator=gen, dtype=torch.float64)
    e = normalize_band_energy(dct_band_energy(x, 10).mean(0))
    expected = torch.tensor(dct_band_sizes(256, 10), dtype=torch.float64) / 256
    # Each chunk sums ~26 * 16 * 200 chi-square(1) terms: relative error ~ 0.6 %.
    assert torch.allclose(e, expected, rtol=0.03)
    assert torch.allclose(e.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_dct_band_energy_of_constant_is_all_in_first_band():
    x = torch.full((2, 3, 6, 10), 2.0, dtype=torch.float64)
    e = dct_band_energy(x, 4)
    assert torch.allclose(e[:, 0], torch.full((2,), 4.0 * 60, dtype=torch.float64))
    assert e[:, 1:].abs().max() < 1e-20
    assert torch.equal(dct_band_energy(x, 4, remove_mean=True).abs() < 1e-20,
                       torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(normalize_band_energy(torch.zeros(3)), torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# Δ log amplitude


def test_delta_log_amplitude_of_constant_plus_diagonal_wave():
    n, k, c, a = 16, 3, 2.0, 0.5
    x = (c + a * plane_wave(n, n, k, k)).expand(2, 4, n, n)
    delta = delta_log_amplitude(x)
    assert delta.shape == (n // 2,)
    # |FFT| (unnormalised): DC c*n^2, the wave a*n^2/2 at (k, k), ~0 elsewhere.
    dc = math.log(c * n * n + 1e-6)
    expected = torch.full((n // 2,), math.log(1e-6) - dc, dtype=torch.float64)
    expected[0] = 0.0
    expected[k] = math.log(a * n * n / 2 + 1e-6) - dc
    assert torch.allclose(delta, expected, atol=1e-4)
    f = diagonal_frequencies(n, n)
    assert math.isclose(f[k].item(), math.hypot(k / n, k / n))


def test_delta_log_amplitude_length_for_odd_and_rectangular_grids():
    assert delta_log_amplitude(torch.randn(1, 2, 15, 15)).shape == (8,)
    assert delta_log_amplitude(torch.randn(1, 2, 9, 20)).shape == (5,)


# ---------------------------------------------------------------------------------------------
# Accumulator


def _batches(h, w, n_batches=4, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 6, h, w, generator=gen, dtype=torch.float64) * (1 + i)
            for i in range(n_batches)]


def test_merge_of_two_halves_equals_one_pass():
    batches = _batches(12, 20)
    whole, first, second = (SpectrumAccumulator(dtype=torch.float64) for _ in range(3))
    for b in batches:
        whole.update(b)
    for b in batches[:2]:
        first.update(b)
    for b in batches[2:]:
        second.update(b)
    before = second.state_tensors()
    merged = first.merge(second)
    assert merged is first
    for key, value in second.state_tensors().items():
        assert torch.equal(value, before[key])
    one, two = whole.state_tensors(), merged.state_tensors()
    for key in SpectrumAccumulator.SUM_KEYS + ("per_image",):
        assert torch.allclose(two[key], one[key], rtol=1e-12, atol=0), key
    _assert_close(merged.result(per_image=True), whole.result(per_image=True))


def _assert_close(a, b):
    """Equal structure, floats to 1e-12 relative."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_close(u, v)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300)
    else:
        assert a == b


def test_state_round_trip_reproduces_result():
    acc = SpectrumAccumulator(dtype=torch.float64)
    for b in _batches(16, 16):
        acc.update(b)
    again = SpectrumAccumulator.from_state(acc.state_tensors(), acc.config, dtype=torch.float64)
    assert again.result(per_image=True) == acc.result(per_image=True)


def test_result_on_rectangular_white_noise():
    acc = SpectrumAccumulator(SpectrumConfig(window=None, remove_mean=False, n_dct_bands=5))
    gen = torch.Generator().manual_seed(6)
    for _ in range(5):
        acc.update(torch.randn(20, 8, 10, 24, generator=gen))
    res = acc.result()
    json.dumps(res, allow_nan=False)
    assert res["grid"] == [10, 24] and res["n_images"] == 100 and res["n_zero_power"] == 0
    np.testing.assert_allclose(res["freqs"], np.arange(13) / 24)
    power, err = np.array(res["power"]), np.array(res["power_stderr"])
    assert np.all(np.abs(power - 1) < 6 * err + 1e-3)
    assert sum(res["ring_counts"]) + res["corner_count"] == 240
    assert res["corner_power_share"] == pytest.approx(res["corner_count"] / 240, rel=0.1)
    np.testing.assert_allclose(res["dct_band_energy"], np.array(res["dct_band_sizes"]) / 240,
                               rtol=0.1)
    share = res["summaries"]["low_band_share"]
    f = np.hypot(np.fft.fftfreq(10)[:, None], np.fft.fftfreq(24)[None, :])
    assert share["ci95"][0] - 0.01 < np.mean(f <= 0.125) < share["ci95"][1] + 0.01
    assert share["n"] == 100 and share["ci95"][0] < share["mean"] < share["ci95"][1]
    assert res["config"] == acc.config.to_dict()


def test_interval_is_student_t():
    acc = SpectrumAccumulator()
    gen = torch.Generator().manual_seed(7)
    acc.update(torch.randn(5, 2, 8, 8, generator=gen))
    res = acc.result(per_image=True)
    values = np.array(res["per_image"]["slope"])
    half = 2.7764 * values.std(ddof=1) / math.sqrt(5)  # t(0.975, 4)
    np.testing.assert_allclose(res["summaries"]["slope"]["ci95"],
                               [values.mean() - half, values.mean() + half], rtol=1e-9)


def test_constant_maps_have_zero_power_and_no_nan():
    acc = SpectrumAccumulator()
    acc.update(torch.full((3, 4, 8, 8), 0.1))
    acc.update(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8)))
    spec = radial_power_spectrum(torch.full((3, 4, 8, 8), 0.1))
    assert spec.zero_power.all() and torch.equal(spec.power, torch.zeros_like(spec.power))
    assert torch.equal(low_band_share(spec), torch.zeros(3))
    res = acc.result(per_image=True)
    json.dumps(res, allow_nan=False)
    assert res["n_zero_power"] == 3 and res["summaries"]["centroid"]["n"] == 2
    assert res["per_image"]["has_power"] == [False, False, False, True, True]
    only_constant = SpectrumAccumulator()
    only_constant.update(torch.zeros(2, 1, 8, 8))
    res = only_constant.result()
    json.dumps(res, allow_nan=False)
    assert res["summaries"]["slope"] == {"mean": None, "ci95": None, "std": None, "n": 0}
    assert res["power"] == [0.0] * 5 and res["corner_power_share"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast_to_float32(dtype):
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(9)).to(dtype)
    spec = radial_power_spectrum(x)
    ref = radial_power_spectrum(x.float())
    assert spec.power.dtype == torch.float32
    assert torch.equal(spec.power, ref.power)
    assert dct_band_energy(x).dtype == torch.float32
    acc = SpectrumAccumulator()
    acc.update(x)
    assert acc.result()["n_images"] == 2


def test_float64_option_and_device_of_output():
    x = torch.randn(1, 2, 8, 8)
    assert radial_power_spectrum(x, dtype=torch.float64).power.dtype == torch.float64
    assert dct2(x, dtype=torch.float64).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Validation


def test_invalid_inputs_raise_one_line_errors():
    cases = [
        (lambda: radial_power_spectrum(torch.zeros(2, 3, 1, 1)), "1x1 grid has no spectrum"),
        (lambda: radial_power_spectrum(torch.zeros(3, 8, 8)), "(B, C, h, w)"),
        (lambda: radial_power_spectrum(torch.zeros(1, 1, 2, 8)), "window=None"),
        (lambda: radial_power_spectrum(torch.zeros(1, 1, 8, 8, dtype=torch.int64)), "floating"),
        (lambda: SpectrumConfig(window="hamming"), "'hann' or None"),
        (lambda: SpectrumConfig(slope_range=(0.4, 0.1)), "fmin < fmax"),
        (lambda: dct_band_energy(torch.zeros(1, 1, 3, 3), 10), "between 1 and the 9"),
    ]
    for call, words in cases:
        with pytest.raises(SpectrumInputError) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value)


def test_accumulator_rejects_changed_grid_and_mismatched_merge():
    acc = SpectrumAccumulator()
    acc.update(torch.randn(1, 2, 8, 8))
    with pytest.raises(SpectrumInputError, match="grid 8x9 differs"):
        acc.update(torch.randn(1, 2, 8, 9))
    other = SpectrumAccumulator()
    other.update(torch.randn(1, 2, 8, 9))
    with pytest.raises(SpectrumInputError, match="grids differ"):
        acc.merge(other)
    with pytest.raises(SpectrumInputError, match="configs differ"):
        acc.merge(SpectrumAccumulator(SpectrumConfig(window=None)))
    with pytest.raises(SpectrumInputError, match="widen slope_range"):
        SpectrumAccumulator().update(torch.randn(1, 1, 3, 3))
