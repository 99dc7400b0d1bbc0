"""Frequency spectra of feature maps: radial power, DCT zig-zag band energy, Δ log amplitude.

Every function takes feature maps shaped ``(B, C, h, w)`` (images, channels, token grid) and works
batched, in torch, on the input's device. Half-precision input is upcast to float32 before any
transform; pass ``dtype=torch.float64`` for double precision.

Conventions (see ``docs/spectra.md``)
-------------------------------------
Frequencies are in cycles per grid cell (cycles per token): ``f_y = fftfreq(h)``,
``f_x = fftfreq(w)``, ``|f| = hypot(f_y, f_x)``, so non-square grids are handled in physical
units. The Nyquist frequency of either axis is 0.5.

Rings ("physical" binning). With ``L = max(h, w)``, ring ``k`` holds the cells with
``(k - 1/2) / L < |f| <= (k + 1/2) / L`` and has centre ``k / L``; ring 0 is the DC cell alone.
Rings run ``k = 0 .. L // 2``; the last one is cut at ``|f| = 0.5`` (a half ring when L is even).
Cells with ``|f| > 0.5`` (the corners of the spectrum) are in no ring: their power is reported
separately and counted in the total power. Ring membership is decided in exact integer
arithmetic, so cells that fall exactly on a ring edge are assigned reproducibly.

Power. The field is optionally mean-removed per channel, multiplied by a separable symmetric
Hann window ``w``, transformed with an orthonormal FFT and squared; the power is divided by
``mean(w**2)`` so that white noise of variance s² has expected power s² in every cell. Without
window and mean removal, the power summed over all ``h * w`` cells equals ``sum(x**2)``
(Parseval). Channels are averaged in power (not log) space.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from prism_probe.errors import NumericsError

__all__ = [
    "SpectrumConfig",
    "SpectrumInputError",
    "RadialSpectrum",
    "hann_window",
    "radial_frequencies",
    "radial_power_spectrum",
    "low_band_share",
    "spectral_centroid",
    "loglog_slope",
    "dct_matrix",
    "dct2",
    "idct2",
    "zigzag_order",
    "dct_band_sizes",
    "dct_band_index",
    "dct_band_energy",
    "normalize_band_energy",
    "delta_log_amplitude",
    "diagonal_frequencies",
    "SpectrumAccumulator",
]


class SpectrumInputError(NumericsError, ValueError):
    """An input tensor or setting cannot be measured (wrong shape, dtype, or a grid too small)."""


# ------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SpectrumConfig:
    """Settings of every spectral measure; recorded in profiles via :meth:`to_dict`.

    Parameters
    ----------
    window : {"hann", None}
        Separable symmetric Hann window applied before the FFT (not before the DCT, whose even
        extension has no edge discontinuity). Needs each grid side to be 1 or at least 3.
    remove_mean : bool
        Subtract each channel's spatial mean before the FFT, so a channel's offset does not
        leak into low rings through the window.
    binning : {"physical", "index"}
        ``"physical"``: rings of width ``1 / max(h, w)`` in cycles per cell (module docstring).
        ``"index"``: pysteps' convention, ring ``round(hypot(ky, kx))`` in integer index units,
        rings ``0 .. L//2 - 1`` for even ``L = max(h, w)`` and ``0 .. L//2`` for odd ``L``;
        meaningful in physical units only on square grids.
    n_dct_bands : int
        Number of zig-zag chunks of the DCT band energy e(k); 0 skips the DCT measure.
    dct_remove_mean : bool
        Subtract channel means before the DCT. Off by default: the UAE paper's measure keeps
        the DC coefficient in the first band.
    low_cutoff : float
        Cutoff in cycles per cell of the low-band share (cells with ``|f| <= low_cutoff``).
    slope_range : (float, float)
        Range of ring centres, in cycles per cell, of the log-log slope fit (inclusive).
    """

    window: str | None = "hann"
    remove_mean: bool = True
    binning: str = "physical"
    n_dct_bands: int = 10
    dct_remove_mean: bool = False
    low_cutoff: float = 0.125
    slope_range: tuple[float, float] = (0.05, 0.4)

    def __post_init__(self) -> None:
        if self.window not in ("hann", None):
            raise SpectrumInputError(f"window={self.window!r} is unknown; use 'hann' or None")
        if self.binning not in ("physical", "index"):
            raise SpectrumInputError(
                f"binning={self.binning!r} is unknown; use 'physical' or 'index'"
            )
        if not isinstance(self.n_dct_bands, int) or self.n_dct_bands < 0:
            raise SpectrumInputError(
                f"n_dct_bands={self.n_dct_bands!r} must be an integer >= 0 (0 skips the DCT)"
            )
        if not 0 < self.low_cutoff:
            raise SpectrumInputError(
                f"low_cutoff={self.low_cutoff!r} must be > 0 cycles per cell (default 0.125)"
            )
        lo, hi = self.slope_range
        if not 0 < lo < hi:
            raise SpectrumInputError(
                f"slope_range={self.slope_range!r} must satisfy 0 < fmin < fmax (cycles per cell)"
            )
        # A list from JSON would make configs compare unequal to the default tuple.
        object.__setattr__(self, "slope_range", (float(lo), float(hi)))

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (``slope_range`` as a list)."""
        d = asdict(self)
        d["slope_range"] = list(self.slope_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SpectrumConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if "slope_range" in d:
            d["slope_range"] = tuple(d["slope_range"])
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# Input checks


def _check_maps(x: Tensor, what: str = "x") -> tuple[int, int, int, int]:
    if not isinstance(x, Tensor):
        raise SpectrumInputError(
            f"{what} is a {type(x).__name__}; pass a torch.Tensor shaped (B, C, h, w)"
        )
    if x.ndim != 4:
        raise SpectrumInputError(
            f"{what} has shape {tuple(x.shape)}; pass feature maps shaped (B, C, h, w) "
            "(reshape ViT tokens (B, h*w, C) to (B, C, h, w))"
        )
    if not x.is_floating_point():
        raise SpectrumInputError(f"{what} has dtype {x.dtype}; pass a real floating tensor")
    b, c, h, w = x.shape
    if b == 0 or c == 0:
        raise SpectrumInputError(f"{what} has shape {tuple(x.shape)}; B and C must be >= 1")
    if h * w < 2:
        raise SpectrumInputError(
            f"a {h}x{w} grid has no spectrum; pass feature maps with at least 2 cells"
        )
    return b, c, h, w


def _compute_dtype(x: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise SpectrumInputError(f"dtype={dtype}; use torch.float32 or torch.float64")
    return dtype


def _check_window_grid(window: str | None, h: int, w: int) -> None:
    if window == "hann" and (h == 2 or w == 2):
        raise SpectrumInputError(
            f"a symmetric Hann window on a {h}x{w} grid is all zero along a side of 2; "
            "use window=None"
        )


# ------------------------------------------------------------------------------------------------
# Window and ring geometry


def _hann_1d(n: int, device, dtype) -> Tensor:
    if n == 1:
        return torch.ones(1, device=device, dtype=dtype)
    return torch.hann_window(n, periodic=False, device=device, dtype=dtype)


def hann_window(h: int, w: int, device=None, dtype=None) -> Tensor:
    """Separable symmetric Hann window.

    Parameters
    ----------
    h, w : int
        Grid size; each must be 1 (no tapering along that axis) or at least 3.

    Returns
    -------
    Tensor, shape (h, w)
        ``outer(hann(h), hann(w))`` with ``hann(n)[i] = 0.5 - 0.5 cos(2 pi i / (n - 1))``:
        zero at the edges, peak 1 (0.5 on the grid nodes nearest the centre for even n).
    """
    if h < 1 or w < 1:
        raise SpectrumInputError(f"window size {h}x{w}; both sides must be >= 1")
    _check_window_grid("hann", h, w)
    dtype = dtype or torch.float32
    return _hann_1d(h, device, dtype)[:, None] * _hann_1d(w, device, dtype)[None, :]


def _integer_freqs(n: int, half: bool) -> np.ndarray:
    # fftfreq(n) * n as exact integers; the rfft half keeps 0 .. n//2.
    if half:
        return np.arange(n // 2 + 1, dtype=np.int64)
    k = np.arange(n, dtype=np.int64)
    return np.where(k < (n + 1) // 2, k, k - n)


def _smallest_k(num: np.ndarray, den: int) -> np.ndarray:
    """Smallest integer k >= 0 with num <= (2k + 1)**2 * den, exactly (num, den integers)."""
    k = np.ceil((np.sqrt((num / den).astype(np.float64)) - 1.0) / 2.0).astype(np.int64)
    k = np.maximum(k, 0)
    # Float rounding can miss by one near a ring edge; fix with exact integer comparisons.
    # Object arrays keep Python's unbounded ints where int64 could overflow (grids > ~1000).
    big = int(num.max(initial=0)) > 2**60 or den * (2 * int(k.max(initial=0)) + 3) ** 2 > 2**62
    n_, k_ = (num.astype(object), k.astype(object)) if big else (num, k)
    k_ = np.where(n_ > (2 * k_ + 1) ** 2 * den, k_ + 1, k_)
    k_ = np.where((k_ > 0) & (n_ <= (2 * k_ - 1) ** 2 * den), k_ - 1, k_)
    return k_.astype(np.int64)


@lru_cache(maxsize=128)
def _ring_geometry(h: int, w: int, binning: str, half: bool):
    ky = _integer_freqs(h, False)[:, None]
    kx = _integer_freqs(w, half)[None, :]
    big_l = max(h, w)
    if binning == "physical":
        if big_l**6 > 2**62:  # the exact comparisons below would overflow int64
            ky, kx = ky.astype(object), kx.astype(object)
        # |f|^2 = ky^2/h^2 + kx^2/w^2; scaled by h^2 w^2 it is the integer q.
        q = ky**2 * w**2 + kx**2 * h**2
        den = (h * w) ** 2
        in_ring = 4 * q <= den
        ring = _smallest_k(4 * big_l**2 * np.where(in_ring, q, 0), den)
        n_bins = big_l // 2 + 1
    else:
        r2 = np.broadcast_to(ky**2 + kx**2, (h, kx.shape[1]))
        ring = np.rint(np.sqrt(r2)).astype(np.int64)  # no ties: r2 is an integer
        n_bins = big_l // 2 if big_l % 2 == 0 else big_l // 2 + 1
        in_ring = ring < n_bins
    ring = np.where(in_ring, ring, n_bins).astype(np.int64)
    radius = np.sqrt(((ky / h) ** 2 + (kx / w) ** 2).astype(np.float64))
    centers = np.arange(n_bins, dtype=np.float64) / big_l
    return ring, centers, np.broadcast_to(radius, ring.shape).copy()


def radial_frequencies(h: int, w: int, binning: str = "physical", *, half: bool = True,
                       device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Ring index of every FFT cell.

    Parameters
    ----------
    h, w : int
        Grid size.
    binning : {"physical", "index"}
        See :class:`SpectrumConfig`.
    half : bool
        True: cells of ``rfft2`` output, shape ``(h, w // 2 + 1)``; False: the full ``fft2``
        layout, shape ``(h, w)`` (unshifted, DC at [0, 0]).

    Returns
    -------
    bin_index : LongTensor, shape (h, w//2 + 1) or (h, w)
        Ring of each cell; cells in no ring (corners) get ``n_bins``.
    centers : Tensor (float64), shape (n_bins,)
        Ring centres in cycles per cell, ``k / max(h, w)``.
    in_ring : BoolTensor, same shape as ``bin_index``
        ``bin_index < n_bins``.
    """
    if binning not in ("physical", "index"):
        raise SpectrumInputError(f"binning={binning!r} is unknown; use 'physical' or 'index'")
    if h < 1 or w < 1 or h * w < 2:
        raise SpectrumInputError(f"a {h}x{w} grid has no spectrum; use at least 2 cells")
    ring, centers, _ = _ring_geometry(h, w, binning, half)
    bin_index = torch.tensor(ring, device=device)  # a copy: the cached array stays intact
    return bin_index, torch.tensor(centers, device=device), bin_index < len(centers)


def _rfft_column_weights(w: int) -> np.ndarray:
    # rfft2 keeps columns 0 .. w//2; columns 1 .. (w-1)//2 stand for their mirror images too.
    weights = np.ones(w // 2 + 1)
    weights[1:(w - 1) // 2 + 1] = 2.0
    return weights


@dataclass(frozen=True)
class _Plan:
    window: Tensor | None
    window_power: float
    bin_index: Tensor          # (M,) over rfft cells, corners -> n_bins
    cell_weight: Tensor        # (M,) multiplicity of each rfft cell in the full spectrum
    reducers: Tensor           # (M, 2): [|f| <= cutoff], |f|
    counts: Tensor             # (n_bins,) full-spectrum cells per ring
    centers: Tensor            # (n_bins,)
    corner_count: int


@lru_cache(maxsize=64)
def _plan(h: int, w: int, window: str | None, binning: str, low_cutoff: float,
          device: torch.device, dtype: torch.dtype) -> _Plan:
    ring, centers, radius = _ring_geometry(h, w, binning, True)
    n_bins = len(centers)
    weight = np.broadcast_to(_rfft_column_weights(w)[None, :], ring.shape)
    counts = np.bincount(ring.ravel(), weights=weight.ravel(), minlength=n_bins + 1)
    # Applied to power already multiplied by the column weights.
    reducers = np.stack([radius <= low_cutoff, radius], -1).reshape(-1, 2)
    win = None
    win_power = 1.0
    if window == "hann":
        win = hann_window(h, w, device=device, dtype=dtype)
        win_power = float((win.double() ** 2).mean())

    def dev(a, dt=dtype):
        return torch.tensor(np.array(a), device=device).to(dt)  # a copy: cached arrays stay intact

    return _Plan(
        window=win,
        window_power=win_power,
        bin_index=dev(ring.ravel(), torch.long),
        cell_weight=dev(weight.ravel()),
        reducers=dev(reducers),
        counts=dev(counts[:n_bins]),
        centers=dev(centers),
        corner_count=int(counts[n_bins]),
    )


# ------------------------------------------------------------------------------------------------
# Radial power spectrum


@dataclass(frozen=True)
class RadialSpectrum:
    """Per-image radial power spectrum, channels averaged (output of radial_power_spectrum).

    Attributes
    ----------
    freqs : Tensor, shape (n_bins,)
        Ring centres, cycles per cell.
    power : Tensor, shape (B, n_bins)
        Mean power per cell in each ring.
    counts : Tensor, shape (n_bins,)
        Number of full-spectrum cells in each ring (``power * counts`` is the ring's power).
    corner_power : Tensor, shape (B,), or None
        Power summed over the cells in no ring (``|f| > 0.5``, or beyond pysteps' last ring).
    corner_count : int
        Number of such cells.
    total_power : Tensor, shape (B,)
        Power summed over all ``h * w`` cells.
    low_power : Tensor, shape (B,)
        Power summed over the cells with ``|f| <= low_cutoff``.
    freq_moment : Tensor, shape (B,)
        ``sum(|f| * power)`` over all cells.
    zero_power : BoolTensor, shape (B,)
        Maps with no measurable power (e.g. constant maps with mean removal); their power and
        summaries are set to zero.
    low_cutoff : float
    """

    freqs: Tensor
    power: Tensor
    counts: Tensor
    corner_power: Tensor | None
    corner_count: int
    total_power: Tensor
    low_power: Tensor
    freq_moment: Tensor
    zero_power: Tensor
    low_cutoff: float


def radial_power_spectrum(x: Tensor, config: SpectrumConfig = SpectrumConfig(), *,
                          return_corner: bool = True,
                          dtype: torch.dtype | None = None) -> RadialSpectrum:
    """Radially averaged power spectrum of feature maps, per image, channels averaged.

    Parameters
    ----------
    x : Tensor, shape (B, C, h, w)
        Feature maps; float16/bfloat16 are upcast to float32.
    config : SpectrumConfig
        Uses ``window``, ``remove_mean``, ``binning`` and ``low_cutoff``.
    return_corner : bool
        Keep the corner power (``corner_power`` is None otherwise; it is always in the total).
    dtype : torch.float32 or torch.float64, optional
        Compute precision; default float64 for float64 input, float32 otherwise.

    Returns
    -------
    RadialSpectrum
        ``power[b, k]`` is the mean over ring k's cells of ``|F|**2 / mean(window**2)``,
        ``F = rfft2(x - mean, norm="ortho")`` (window applied), averaged over channels.

    Notes
    -----
    Conventions are in the module docstring. ``rfft2`` stores one half of the spectrum: its
    columns ``1 .. (w-1)//2`` are counted twice, the DC and (even w) Nyquist columns once.

    Relation to pysteps: ``rapsd(field, fft_method=np.fft)`` computes
    ``|fftshift(fft2(field))|**2 / (h * w)``, which is ``|rfft2(field, norm="ortho")|**2``:
    with ``binning="index"``, ``window=None`` and ``remove_mean=False``, ``power[b]`` equals
    the mean over channels of ``rapsd`` of each channel (its last ring, ``L/2`` for even L,
    is counted in the corners here).

    A map counts as zero power when its total power is exactly 0 or, with mean removal, at most
    ``(h*w*eps)**2`` times its squared channel mean (the rounding residue of a constant map;
    ``eps`` of the compute dtype). Fluctuations that small are not resolved in float32 either;
    use ``dtype=torch.float64`` for maps whose mean dwarfs their variation. Non-finite input
    gives non-finite output (not checked here, to avoid a device sync).
    """
    _, c, h, w = _check_maps(x)
    dt = _compute_dtype(x, dtype)
    _check_window_grid(config.window, h, w)
    plan = _plan(h, w, config.window, config.binning, float(config.low_cutoff), x.device, dt)

    xf = x.to(dt)
    scale2 = None
    if config.remove_mean:
        mean = xf.mean(dim=(-2, -1), keepdim=True)
        scale2 = mean.square().mean(dim=(1, 2, 3))
        xf = xf - mean
    if plan.window is not None:
        xf = xf * plan.window if xf is x else xf.mul_(plan.window)

    spec = torch.fft.rfft2(xf, norm="ortho")
    # real^2 + imag^2 is about twice as fast as abs().square() and avoids a sqrt; adding imag^2
    # in place saves a temporary and a pass over memory, which is what this epilogue costs.
    pmap = spec.real.square().addcmul_(spec.imag, spec.imag)
    pmap = pmap.mean(dim=1).reshape(x.shape[0], -1)
    pmap = pmap * (plan.cell_weight / plan.window_power)

    n_bins = len(plan.centers)
    sums = pmap.new_zeros(x.shape[0], n_bins + 1).index_add_(1, plan.bin_index, pmap)
    extra = pmap @ plan.reducers
    total = sums.sum(dim=1)

    eps = torch.finfo(dt).eps
    zero = total <= 0
    if scale2 is not None:
        zero = zero | (total <= (h * w * eps) ** 2 * scale2)
    keep = (~zero).to(dt)
    sums = sums * keep[:, None]
    return RadialSpectrum(
        freqs=plan.centers.clone(),
        power=sums[:, :n_bins] / plan.counts,
        counts=plan.counts.clone(),
        corner_power=sums[:, n_bins] if return_corner else None,
        corner_count=plan.corner_count,
        total_power=total * keep,
        low_power=extra[:, 0] * keep,
        freq_moment=extra[:, 1] * keep,
        zero_power=zero,
        low_cutoff=float(config.low_cutoff),
    )


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    # Zero-power maps have den == 0; give them 0 instead of NaN.
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def low_band_share(spectrum: RadialSpectrum) -> Tensor:
    """Share of the power at ``|f| <= low_cutoff``, per image.

    Every FFT cell counts with its own power; the denominator is the power of all cells,
    corners included. Returns a Tensor of shape (B,) in [0, 1]; 0 for zero-power maps.
    """
    return _safe_ratio(spectrum.low_power, spectrum.total_power)


def spectral_centroid(spectrum: RadialSpectrum) -> Tensor:
    """Power-weighted mean ``|f|`` over all cells (corners included), cycles per cell.

    Returns a Tensor of shape (B,); 0 for zero-power maps.
    """
    return _safe_ratio(spectrum.freq_moment, spectrum.total_power)


def loglog_slope(freqs: Tensor, power: Tensor, fmin: float, fmax: float) -> Tensor:
    """Least-squares slope of ``log power`` against ``log f``, per image.

    Parameters
    ----------
    freqs : Tensor, shape (n_bins,)
        Ring centres, cycles per cell.
    power : Tensor, shape (B, n_bins)
        Ring power (e.g. ``RadialSpectrum.power``).
    fmin, fmax : float
        Rings with ``fmin <= freqs <= fmax`` enter the fit, unweighted.

    Returns
    -------
    Tensor, shape (B,)
        The slope (a spectrum ``P ∝ |f|**-a`` gives ``-a``). Rings with zero power are left
        out of an image's fit; an image with fewer than 2 positive rings gets 0.
    """
    if power.ndim != 2 or freqs.ndim != 1 or power.shape[1] != freqs.shape[0]:
        raise SpectrumInputError(
            f"freqs {tuple(freqs.shape)} and power {tuple(power.shape)} must be (n,) and (B, n)"
        )
    sel = (freqs >= fmin) & (freqs <= fmax)
    if int(sel.sum()) < 2:
        raise SpectrumInputError(
            f"only {int(sel.sum())} ring centre(s) in [{fmin}, {fmax}] cycles per cell; widen "
            "slope_range or use a larger grid"
        )
    lf = torch.log(freqs[sel].to(power.dtype))[None, :]
    p = power[:, sel]
    ok = (p > 0).to(power.dtype)
    lp = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    n = ok.sum(dim=1)
    nsafe = n.clamp_min(1)
    mx = (ok * lf).sum(dim=1) / nsafe
    my = (ok * lp).sum(dim=1) / nsafe
    dx = (lf - mx[:, None]) * ok
    sxx = dx.square().sum(dim=1)
    sxy = (dx * (lp - my[:, None])).sum(dim=1)
    good = (n >= 2) & (sxx > 0)
    return torch.where(good, sxy / torch.where(good, sxx, torch.ones_like(sxx)),
                       torch.zeros_like(sxx))


# ------------------------------------------------------------------------------------------------
# DCT


@lru_cache(maxsize=64)
def _dct_matrix_cached(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(device=device, dtype=dtype)


def dct_matrix(n: int, device=None, dtype=None) -> Tensor:
    """Orthonormal DCT-II matrix.

    Returns
    -------
    Tensor, shape (n, n)
        ``D[k, i] = s_k cos(pi (2i + 1) k / (2n))`` with ``s_0 = sqrt(1/n)``,
        ``s_k = sqrt(2/n)``; ``D @ v`` equals ``scipy.fft.dct(v, norm="ortho")`` and
        ``D.T`` is its inverse.
    """
    if not isinstance(n, int) or n < 1:
        raise SpectrumInputError(f"DCT size n={n!r} must be an integer >= 1")
    return _dct_matrix_cached(n, torch.device(device or "cpu"), dtype or torch.float32).clone()


def _dct_pair(x: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise SpectrumInputError(
            f"DCT input must be a real floating tensor with >= 2 dims, got "
            f"{getattr(x, 'shape', type(x).__name__)}"
        )
    dt = _compute_dtype(x, dtype)
    h, w = x.shape[-2:]
    return (x.to(dt), _dct_matrix_cached(h, x.device, dt), _dct_matrix_cached(w, x.device, dt))


def dct2(x: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dims: ``D_h @ x @ D_w.T`` (same as
    ``scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")``). Shape is kept; coefficient (u, v)
    has frequency ``(u / 2h, v / 2w)`` cycles per cell."""
    xf, dh, dw = _dct_pair(x, dtype)
    return torch.matmul(dh, torch.matmul(xf, dw.mT))


def idct2(x: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Inverse of :func:`dct2`: ``D_h.T @ X @ D_w``."""
    xf, dh, dw = _dct_pair(x, dtype)
    return torch.matmul(dh.mT, torch.matmul(xf, dw))


@lru_cache(maxsize=128)
def _zigzag_np(h: int, w: int) -> np.ndarray:
    order = []
    for s in range(h + w - 1):
        rows = range(max(0, s - w + 1), min(s, h - 1) + 1)
        # JPEG: odd anti-diagonals run down (row increasing), even ones run up.
        rows = rows if s % 2 == 1 else reversed(rows)
        order.extend(u * w + (s - u) for u in rows)
    return np.asarray(order, dtype=np.int64)


def zigzag_order(h: int, w: int) -> Tensor:
    """JPEG zig-zag order of an ``h x w`` coefficient grid, for h != w too.

    Coefficients are visited by anti-diagonal ``s = u + v`` (u row, v column); odd diagonals
    run with increasing row, even ones with decreasing row, as in JPEG's 8x8 table.

    Returns
    -------
    LongTensor, shape (h * w,)
        Row-major flat indices ``u * w + v`` in visiting order.
    """
    if h < 1 or w < 1:
        raise SpectrumInputError(f"zig-zag of a {h}x{w} grid; both sides must be >= 1")
    return torch.from_numpy(_zigzag_np(h, w).copy())


def dct_band_sizes(n_coefficients: int, n_bands: int) -> list[int]:
    """Chunk sizes of ``numpy.array_split(range(n_coefficients), n_bands)``: sizes differ by at
    most one, larger chunks first."""
    if not 1 <= n_bands <= n_coefficients:
        raise SpectrumInputError(
            f"n_bands={n_bands} must be between 1 and the {n_coefficients} DCT coefficients"
        )
    q, r = divmod(n_coefficients, n_bands)
    return [q + 1] * r + [q] * (n_bands - r)


@lru_cache(maxsize=128)
def _band_index_np(h: int, w: int, n_bands: int) -> np.ndarray:
    sizes = dct_band_sizes(h * w, n_bands)
    band_of_rank = np.repeat(np.arange(n_bands), sizes)
    band = np.empty(h * w, dtype=np.int64)
    band[_zigzag_np(h, w)] = band_of_rank
    return band


def dct_band_index(h: int, w: int, n_bands: int) -> Tensor:
    """Zig-zag chunk of every DCT coefficient.

    Returns
    -------
    LongTensor, shape (h, w)
        ``band[u, v]`` in ``0 .. n_bands - 1``; chunks are consecutive in zig-zag order with
        sizes :func:`dct_band_sizes`.
    """
    return torch.from_numpy(_band_index_np(h, w, n_bands).reshape(h, w).copy())


@lru_cache(maxsize=64)
def _band_index_dev(h: int, w: int, n_bands: int, device: torch.device) -> Tensor:
    return torch.from_numpy(_band_index_np(h, w, n_bands)).to(device)


def dct_band_energy(x: Tensor, n_bands: int = 10, *, remove_mean: bool = False,
                    dtype: torch.dtype | None = None) -> Tensor:
    """DCT zig-zag band energy per image (the UAE paper's measure, unnormalised).

    Parameters
    ----------
    x : Tensor, shape (B, C, h, w)
    n_bands : int
        Number of zig-zag chunks, ``1 .. h*w`` (sizes as numpy.array_split).
    remove_mean : bool
        Subtract channel means first (zeroes the DC coefficient). The paper does not.

    Returns
    -------
    Tensor, shape (B, n_bands)
        Per image, the sum over each chunk of squared orthonormal DCT-II coefficients,
        averaged over channels. No window. Average over images first, then normalise with
        :func:`normalize_band_energy` to get the paper's e(k).
    """
    _, _, h, w = _check_maps(x)
    dct_band_sizes(h * w, n_bands)
    bands = _band_index_dev(h, w, n_bands, x.device)
    xf = x.to(_compute_dtype(x, dtype))
    if remove_mean:
        xf = xf - xf.mean(dim=(-2, -1), keepdim=True)
    # dct2 returns a fresh tensor: squaring it in place saves a temporary of the input's size.
    energy = dct2(xf).square_().mean(dim=1).reshape(x.shape[0], -1)
    return energy.new_zeros(x.shape[0], n_bands).index_add_(1, bands, energy)


def normalize_band_energy(energy: Tensor) -> Tensor:
    """``energy / energy.sum(-1)`` along the last dim; rows summing to 0 stay 0 (no NaN)."""
    total = energy.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, energy / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(energy))


# ------------------------------------------------------------------------------------------------
# Δ log amplitude (Park & Kim)


def _diagonal_length(h: int, w: int) -> int:
    # Park & Kim take the shifted diagonal from the centre on: ceil(n/2) entries per side.
    return min((h + 1) // 2, (w + 1) // 2)


def diagonal_frequencies(h: int, w: int) -> Tensor:
    """``|f|`` (cycles per cell) of the cells ``(i, i)`` used by :func:`delta_log_amplitude`,
    ``i = 0 .. min(ceil(h/2), ceil(w/2)) - 1``; float64, shape (n,)."""
    i = torch.arange(_diagonal_length(h, w), dtype=torch.float64)
    return torch.hypot(i / h, i / w)


def delta_log_amplitude(x: Tensor, *, eps: float = 1e-6,
                        dtype: torch.dtype | None = None) -> Tensor:
    """Relative log amplitude along the half diagonal of the spectrum (Park & Kim, 2022).

    Parameters
    ----------
    x : Tensor, shape (B, C, h, w)
    eps : float
        Added to ``|FFT2|`` before the log.

    Returns
    -------
    Tensor, shape (n,), n = min(ceil(h/2), ceil(w/2))
        ``A[i] - A[0]`` with ``A = mean over (B, C) of log(|fft2(x)| + eps)`` (unnormalised
        "backward" FFT, no window, no mean removal) at cell ``(i, i)``: in the shifted spectrum,
        the diagonal from DC towards the corner. Frequencies: :func:`diagonal_frequencies`.
    """
    _, _, h, w = _check_maps(x)
    xf = x.to(_compute_dtype(x, dtype))
    i = torch.arange(_diagonal_length(h, w), device=x.device)
    diag = torch.fft.rfft2(xf)[:, :, i, i]
    amp = torch.log(diag.abs() + eps).mean(dim=(0, 1))
    return amp - amp[0]


# ------------------------------------------------------------------------------------------------
# Accumulation over images

# Two-sided 95 % Student-t quantiles for 1..30 degrees of freedom.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.306, 2.2622, 2.2281,
         2.201, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.093, 2.086,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def _t975(dof: int) -> float:
    if dof <= len(_T975):
        return _T975[dof - 1]
    # Cornish-Fisher expansion about the normal quantile; error < 1e-5 beyond 30 dof.
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3))


def _mean_interval(values: np.ndarray, bounds: tuple[float, float] | None = None) -> dict:
    """Mean and Student-t 95 % interval; the interval is clipped to ``bounds`` (a share cannot
    leave [0, 1], although a t interval on a few images can)."""
    n = int(values.size)
    if n == 0:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "ci95": None, "std": None, "n": 1}
    std = float(values.std(ddof=1))
    half = _t975(n - 1) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "ci95": [lo, hi], "std": std, "n": n}


_SUMMARIES = ("low_band_share", "centroid", "slope")

# Up to this many elements per batch (512 kB of float32) the update runs on one intra-op thread.
# Its ~25 operators are then so short that a second thread gains nothing, while each one pays an
# OpenMP barrier, and on a CPU shared with other work (decoding workers included) a barrier can
# wait a whole time slice for a descheduled thread (on two loaded cores a 32x64x8x8 batch took
# 140 ms on two threads and 5 ms on one). Larger batches keep the caller's thread count: on idle
# cores two threads are 1.4-2x faster at the sizes of BENCHMARKS.md.
_SERIAL_MAX_NUMEL = 1 << 17


@contextmanager
def _serial_if_small(x: Tensor):
    threads = torch.get_num_threads()
    if x.device.type != "cpu" or threads == 1 or x.numel() > _SERIAL_MAX_NUMEL:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SpectrumAccumulator:
    """Running spectra of many images' feature maps, mergeable across workers.

    Memory is fixed per grid except 4 float64 numbers per image (low-band share, centroid,
    slope, and a flag that the map had power). All sums are float64 on the device of the
    first update.

    Under ``torchrun``: ``state = acc.state_tensors()``, ``all_reduce`` (sum) the tensors named
    in :attr:`SUM_KEYS`, ``all_gather`` ``state["per_image"]`` and concatenate, then
    ``SpectrumAccumulator.from_state(state, config)`` on any rank.
    """

    SUM_KEYS = ("n_images", "power_sum", "power_sumsq", "corner_sum", "total_sum",
                "band_sum", "band_sumsq")
    GATHER_KEYS = ("per_image",)

    def __init__(self, config: SpectrumConfig = SpectrumConfig(), *,
                 dtype: torch.dtype | None = None) -> None:
        if not isinstance(config, SpectrumConfig):
            raise SpectrumInputError(f"config is a {type(config).__name__}; pass SpectrumConfig")
        self.config = config
        self.dtype = dtype
        self.grid: tuple[int, int] | None = None
        self._sums: dict[str, Tensor] = {}
        self._per_image: list[Tensor] = []

    # -- setup

    def _start(self, h: int, w: int, device: torch.device) -> None:
        cfg = self.config
        _check_window_grid(cfg.window, h, w)
        n_bins = len(_ring_geometry(h, w, cfg.binning, True)[1])
        centers = torch.arange(n_bins, dtype=torch.float64) / max(h, w)
        fmin, fmax = cfg.slope_range
        n_fit = int(((centers >= fmin) & (centers <= fmax)).sum())
        if n_fit < 2:
            raise SpectrumInputError(
                f"a {h}x{w} grid has {n_fit} ring centre(s) in slope_range {cfg.slope_range}; "
                "widen slope_range"
            )
        k = cfg.n_dct_bands
        if k:
            dct_band_sizes(h * w, k)
        z = dict(dtype=torch.float64, device=device)
        self._sums = {
            "n_images": torch.zeros(1, **z),
            "power_sum": torch.zeros(n_bins, **z),
            "power_sumsq": torch.zeros(n_bins, **z),
            "corner_sum": torch.zeros(1, **z),
            "total_sum": torch.zeros(1, **z),
            "band_sum": torch.zeros(k, **z),
            "band_sumsq": torch.zeros(k, **z),
        }
        self.grid = (h, w)

    @property
    def device(self) -> torch.device | None:
        return self._sums["n_images"].device if self._sums else None

    @property
    def n_images(self) -> int:
        return int(self._sums["n_images"].item()) if self._sums else 0

    # -- accumulation

    def update(self, x: Tensor) -> None:
        """Add a batch of feature maps ``x`` of shape (B, C, h, w); the grid is fixed by the
        first update."""
        b, _, h, w = _check_maps(x)
        if self.grid is None:
            self._start(h, w, x.device)
        elif (h, w) != self.grid:
            raise SpectrumInputError(
                f"grid {h}x{w} differs from this accumulator's {self.grid[0]}x{self.grid[1]}; "
                "use one accumulator per grid size"
            )
        elif x.device != self.device:
            raise SpectrumInputError(
                f"x is on {x.device} but this accumulator is on {self.device}; move x there"
            )
        with _serial_if_small(x):
            self._accumulate(x, b)

    def _accumulate(self, x: Tensor, b: int) -> None:
        cfg = self.config
        spec = radial_power_spectrum(x, cfg, dtype=self.dtype)
        s = self._sums
        power = spec.power.double()
        s["n_images"] += b
        s["power_sum"] += power.sum(dim=0)
        s["power_sumsq"] += power.square().sum(dim=0)
        s["corner_sum"] += spec.corner_power.double().sum()
        s["total_sum"] += spec.total_power.double().sum()
        if cfg.n_dct_bands:
            bands = dct_band_energy(x, cfg.n_dct_bands, remove_mean=cfg.dct_remove_mean,
                                    dtype=self.dtype).double()
            s["band_sum"] += bands.sum(dim=0)
            s["band_sumsq"] += bands.square().sum(dim=0)
        slope = loglog_slope(spec.freqs, spec.power, *cfg.slope_range)
        per_image = torch.stack([low_band_share(spec), spectral_centroid(spec), slope,
                                 (~spec.zero_power).to(slope.dtype)], dim=1)
        self._per_image.append(per_image.double())

    def merge(self, other: "SpectrumAccumulator") -> "SpectrumAccumulator":
        """Add ``other``'s images to this accumulator (``other`` is unchanged); returns self."""
        if not isinstance(other, SpectrumAccumulator):
            raise SpectrumInputError(f"cannot merge a {type(other).__name__}")
        if other is self:
            raise SpectrumInputError("cannot merge an accumulator into itself; merge a copy")
        if other.config != self.config:
            raise SpectrumInputError(
                f"configs differ ({other.config.to_dict()} vs {self.config.to_dict()}); "
                "merge only accumulators built with the same SpectrumConfig"
            )
        if other.grid is None:
            return self
        if self.grid is None:
            self._start(*other.grid, other.device)
        elif other.grid != self.grid:
            raise SpectrumInputError(
                f"grids differ ({other.grid} vs {self.grid}); merge only equal grids"
            )
        for key, value in other._sums.items():
            self._sums[key] += value.to(self.device)
        self._per_image.extend(t.to(self.device) for t in other._per_image)
        return self

    # -- state for distributed reduction

    def _per_image_tensor(self) -> Tensor:
        if not self._per_image:
            return torch.zeros(0, 4, dtype=torch.float64, device=self.device)
        if len(self._per_image) > 1:
            self._per_image = [torch.cat(self._per_image)]
        return self._per_image[0]

    def state_tensors(self) -> dict[str, Tensor]:
        """Copies of the float64 sums (:attr:`SUM_KEYS`), ``per_image`` (n, 4) and ``grid``
        (int64, [h, w]); raises if nothing was accumulated."""
        if self.grid is None:
            raise SpectrumInputError("this accumulator has no images; call update() first")
        state = {k: v.clone() for k, v in self._sums.items()}
        state["per_image"] = self._per_image_tensor().clone()
        state["grid"] = torch.tensor(self.grid, dtype=torch.long, device=self.device)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Tensor], config: SpectrumConfig = SpectrumConfig(), *,
                   dtype: torch.dtype | None = None) -> "SpectrumAccumulator":
        """Rebuild an accumulator from :meth:`state_tensors` (possibly reduced across ranks)."""
        missing = [k for k in (*cls.SUM_KEYS, *cls.GATHER_KEYS, "grid") if k not in state]
        if missing:
            raise SpectrumInputError(f"state lacks {missing}; pass state_tensors() output")
        acc = cls(config, dtype=dtype)
        h, w = (int(v) for v in state["grid"].tolist())
        acc._start(h, w, state["power_sum"].device)
        for key in cls.SUM_KEYS:
            if state[key].shape != acc._sums[key].shape:
                raise SpectrumInputError(
                    f"state[{key!r}] has shape {tuple(state[key].shape)}, expected "
                    f"{tuple(acc._sums[key].shape)} for grid {h}x{w} and this config"
                )
            acc._sums[key] = state[key].to(torch.float64).clone()
        per_image = state["per_image"].to(torch.float64)
        if int(acc._sums["n_images"].item()) != per_image.shape[0]:
            raise SpectrumInputError(
                f"state has n_images={int(acc._sums['n_images'].item())} but "
                f"{per_image.shape[0]} per-image rows; gather per_image from every rank"
            )
        acc._per_image = [per_image.clone()]
        return acc

    # -- results

    def result(self, *, per_image: bool = False) -> dict:
        """Summary of all images so far, JSON-able.

        Returns
        -------
        dict
            ``freqs`` (ring centres, cycles per cell), ``ring_counts``; ``power`` (mean over
            images of the channel-averaged mean power per ring) and ``power_stderr`` (its
            standard error over images; None with one image); ``corner_power_share`` (corner
            power over total power, both summed over images) and ``corner_count``;
            ``dct_band_energy`` (e(k): mean band energy over images, normalised to sum 1),
            ``dct_band_energy_stderr`` (standard error of each band's mean over images, divided
            by the same normaliser), ``dct_band_sizes``; ``summaries``: for
            ``low_band_share``, ``centroid`` (cycles per cell) and ``slope`` (log-log, over
            ``slope_range``), the mean over images with ``ci95`` = mean ± t(0.975, n-1)·s/√n
            (Student t interval of the mean), ``std`` and ``n``; maps with zero power are
            left out of the summaries and counted in ``n_zero_power``. Also ``interval_method``,
            ``n_images``, ``grid`` [h, w], ``config``; with ``per_image=True`` the per-image
            summary values (NaN never occurs; zero-power maps get 0).
        """
        if self.grid is None:
            raise SpectrumInputError("this accumulator has no images; call update() first")
        s = {k: v.detach().cpu().numpy() for k, v in self._sums.items()}
        if not all(np.isfinite(v).all() for v in s.values()):
            raise NumericsError(
                "feature maps contained NaN or inf; check the encoder's output and precision"
            )
        h, w = self.grid
        n = float(s["n_images"][0])
        centers = np.arange(len(s["power_sum"])) / max(h, w)
        counts = _plan_counts(h, w, self.config.binning)

        mean_p = s["power_sum"] / n
        stderr_p = _stderr(s["power_sum"], s["power_sumsq"], n)
        total = float(s["total_sum"][0])
        corner_share = float(s["corner_sum"][0]) / total if total > 0 else 0.0

        band_mean = s["band_sum"] / n
        band_norm = float(band_mean.sum())
        if band_norm > 0:
            e = band_mean / band_norm
            e_err = None if n < 2 else (_stderr(s["band_sum"], s["band_sumsq"], n) / band_norm)
        else:
            e, e_err = np.zeros_like(band_mean), None

        values = self._per_image_tensor().detach().cpu().numpy()
        valid = values[:, 3] > 0
        summaries = {name: _mean_interval(values[valid, i],
                                          (0.0, 1.0) if name == "low_band_share" else None)
                     for i, name in enumerate(_SUMMARIES)}
        out = {
            "freqs": centers.tolist(),
            "ring_counts": counts.tolist(),
            "power": mean_p.tolist(),
            "power_stderr": None if stderr_p is None else stderr_p.tolist(),
            "corner_power_share": corner_share,
            "corner_count": int(h * w - counts.sum()),
            "dct_band_energy": e.tolist(),
            "dct_band_energy_stderr": None if e_err is None else e_err.tolist(),
            "dct_band_sizes": dct_band_sizes(h * w, len(e)) if len(e) else [],
            "summaries": summaries,
            "interval_method": "student-t 95% interval of the mean over images "
                               "(mean ± t(0.975, n-1)·std/sqrt(n)), clipped to [0, 1] for the "
                               "low-band share; zero-power maps excluded",
            "n_images": int(n),
            "n_zero_power": int((~valid).sum()),
            "grid": [h, w],
            "config": self.config.to_dict(),
        }
        if per_image:
            out["per_image"] = {name: values[:, i].tolist() for i, name in enumerate(_SUMMARIES)}
            out["per_image"]["has_power"] = valid.tolist()
        return out


def _plan_counts(h: int, w: int, binning: str) -> np.ndarray:
    ring, centers, _ = _ring_geometry(h, w, binning, True)
    weight = np.broadcast_to(_rfft_column_weights(w)[None, :], ring.shape)
    counts = np.bincount(ring.ravel(), weights=weight.ravel(), minlength=len(centers) + 1)
    return counts[: len(centers)].astype(np.int64)


def _stderr(total: np.ndarray, total_sq: np.ndarray, n: float) -> np.ndarray | None:
    if n < 2:
        return None
    var = np.maximum(total_sq - total**2 / n, 0.0) / (n - 1)
    return np.sqrt(var / n)
