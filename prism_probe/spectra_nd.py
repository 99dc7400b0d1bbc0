"""Spectra beyond still images: spatiotemporal (video token grids) and 1-D (token sequences).

This module extends :mod:`prism_probe.spectra` and reuses its conventions and helpers (the
symmetric Hann window, exact ring geometry, orthonormal transforms, power divided by
``mean(w**2)``, channels averaged in power, Student-t intervals over inputs, mergeable float64
sums). Read that module's docstring first; what differs is stated here.

Video: feature grids (B, C, t, h, w)
------------------------------------
Frequencies are in cycles per grid cell: ``f_t = fftfreq(t)`` cycles per temporal cell (a
tubelet for VideoMAE, a frame for per-frame encoders), ``f_y, f_x`` as for images. The spatial
rings are exactly those of :func:`prism_probe.spectra.radial_frequencies`; temporal bins are the
folded ``|f_t| = k / t``, ``k = 0 .. t // 2`` (no wider bins: a clip has few temporal cells).

Power. ``remove_mean`` subtracts each channel's spatial mean in every frame (the image
convention applied frame by frame; the temporal changes of a channel's frame mean are therefore
not measured). The field is split into its temporal mean (the static part, one frame) and the
rest. The static part goes through the spatial window only and is the whole of ``f_t = 0``;
the rest is multiplied by the spatial and the temporal window and gives every ``f_t != 0`` (its
own ``f_t = 0`` value is window leakage and is dropped; it is exactly zero without a temporal
window). A static clip thus has no power beyond ``f_t = 0`` whatever the window, and without
windows the split changes nothing (the 3-D FFT is linear). The orthonormal 3-D FFT power is
divided by ``mean(w_s**2) * mean(w_t**2)`` (``mean(w_s**2)`` for the static part), so white noise
of variance s² has expected power s² at ``f_t = 0`` and close to s² elsewhere; the lowest
non-zero temporal bin reads low by ``|W(1)|**2 / (t sum(w**2))`` (about 22 % for t = 8 with a
Hann window, the temporal analogue of the first ring's dip for images); use
``temporal_window=None`` where a flat white-noise reference matters more than leakage.

Reported, per clip and channel-averaged:

- spatial spectrum: for each spatial ring, the power per cell averaged over all temporal
  frequencies. Without windows this equals the mean over frames of the per-frame 2-D spectrum
  (Parseval along time).
- temporal spectrum: for each ``|f_t|`` bin, the power per cell averaged over every spatial
  cell (corners included).
- map: power per cell in each (temporal bin, spatial ring); spatial corners are in no ring.

1-D: token sequences (B, L, C) with a validity mask (B, L)
----------------------------------------------------------
Only the tokens the mask marks valid are measured (special tokens and padding are excluded by
the caller's mask). Each sequence's valid tokens, in order, are measured on their own length
``n``: channel means removed (option), a symmetric Hann window of length ``n``, orthonormal
``rfft``, power divided by ``mean(w**2)``. Frequencies ``k / n`` cycles per token are put in
bins of fixed width ``1 / resolution`` cycles per token, the same for every length: bin ``j``
holds ``(j - 1/2) / N < f <= (j + 1/2) / N`` (``N = resolution``; bin 0 is ``[0, 1/2N]``), decided
in exact integer arithmetic. A sequence's value in a bin is its mean power per frequency cell
there (a folded frequency counts twice, as a ring cell does); a bin that holds none of a short
sequence's frequencies is left out of that sequence's mean, and ``bin_sequences`` says how many
sequences each bin's mean is over. The DCT band energy splits the ``n`` orthonormal DCT-II
coefficients of each sequence into K chunks of consecutive coefficients (sizes as
``numpy.array_split``, so band k covers about ``[k/2K, (k+1)/2K)`` cycles per token on any
length), divides by ``n`` (energy per token, so long sequences do not outweigh short ones) and
averages over sequences before normalising to sum 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .spectra import (
    SpectrumConfig,
    SpectrumInputError,
    _compute_dtype,
    _hann_1d,
    _mean_interval,
    _ring_geometry,
    _rfft_column_weights,
    _stderr,
    dct_band_energy,
    dct_band_sizes,
    dct_matrix,
    loglog_slope,
)

__all__ = [
    "VideoSpectrumConfig",
    "SpatiotemporalSpectrum",
    "spatiotemporal_power_spectrum",
    "SpatiotemporalAccumulator",
    "SequenceSpectrumConfig",
    "TokenSpectrum",
    "token_power_spectrum",
    "TokenSpectrumAccumulator",
    "valid_spans",
    "temporal_band_filter",
    "token_band_filter",
]


def _interval_note(what: str) -> str:
    return (f"student-t 95% interval of the mean over {what} (mean ± t(0.975, n-1)·std/sqrt(n)); "
            "zero-power inputs excluded")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)),
                       torch.zeros_like(num))


# ------------------------------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class VideoSpectrumConfig:
    """Settings of the spatiotemporal measure; recorded in profiles via :meth:`to_dict`.

    Parameters
    ----------
    spectrum : SpectrumConfig
        The spatial settings, as for images: ``window`` (also the spatial window here),
        ``remove_mean`` (per frame), ``binning``, ``n_dct_bands`` (spatial zig-zag bands of each
        frame, averaged over frames), ``low_cutoff`` and ``slope_range`` (cycles per cell).
    temporal_window : {"hann", None}
        Window along time, applied to the part of the clip that changes (module docstring).
        Needs 1 or at least 3 temporal cells.
    temporal_cutoff : float
        Cutoff of the temporal low-band share, cycles per temporal cell (``|f_t| <= cutoff``).
    """

    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    temporal_window: str | None = "hann"
    temporal_cutoff: float = 0.125

    def __post_init__(self) -> None:
        if not isinstance(self.spectrum, SpectrumConfig):
            raise SpectrumInputError(
                f"spectrum is a {type(self.spectrum).__name__}; pass a SpectrumConfig")
        if self.temporal_window not in ("hann", None):
            raise SpectrumInputError(
                f"temporal_window={self.temporal_window!r} is unknown; use 'hann' or None")
        if not self.temporal_cutoff >= 0:
            raise SpectrumInputError(
                f"temporal_cutoff={self.temporal_cutoff!r} must be >= 0 cycles per cell")

    def to_dict(self) -> dict:
        """The spatial settings' dict plus ``temporal_window`` and ``temporal_cutoff``."""
        return {**self.spectrum.to_dict(), "temporal_window": self.temporal_window,
                "temporal_cutoff": float(self.temporal_cutoff)}


def _check_clips(x: Tensor, what: str = "x") -> tuple[int, int, int, int, int]:
    if not isinstance(x, Tensor):
        raise SpectrumInputError(f"{what} is a {type(x).__name__}; pass a torch.Tensor shaped "
                                 "(B, C, t, h, w)")
    if x.ndim != 5:
        raise SpectrumInputError(
            f"{what} has shape {tuple(x.shape)}; pass feature grids shaped (B, C, t, h, w) "
            "(tubelet tokens (B, t*h*w, C) reshaped time-major)")
    if not x.is_floating_point():
        raise SpectrumInputError(f"{what} has dtype {x.dtype}; pass a real floating tensor")
    b, c, t, h, w = x.shape
    if b == 0 or c == 0 or t == 0:
        raise SpectrumInputError(f"{what} has shape {tuple(x.shape)}; B, C and t must be >= 1")
    if h * w < 2:
        raise SpectrumInputError(f"a {h}x{w} spatial grid has no spectrum; use at least 2 cells")
    return b, c, t, h, w


def _check_window_len(window: str | None, n: int, what: str) -> None:
    if window == "hann" and n == 2:
        raise SpectrumInputError(f"a symmetric Hann window over {n} {what} is all zero; use "
                                 "window None along that axis, or more cells")


@lru_cache(maxsize=32)
def _st_geometry(t: int, h: int, w: int, binning: str):
    ring, centers, radius = _ring_geometry(h, w, binning, True)
    n_rings = len(centers)
    kt = np.arange(t)
    tbin = np.minimum(kt, t - kt)  # folded |f_t| * t
    n_t = t // 2 + 1
    col = np.broadcast_to(_rfft_column_weights(w)[None, :], ring.shape)
    # Flat index over (t, h, w//2 + 1): temporal bin × (rings + a corner slot).
    index = tbin[:, None, None] * (n_rings + 1) + ring[None]
    weight = np.broadcast_to(col[None], (t,) + ring.shape)
    counts = np.bincount(index.ravel(), weights=weight.ravel(),
                         minlength=n_t * (n_rings + 1)).reshape(n_t, n_rings + 1)
    ft = np.broadcast_to((tbin / t)[:, None, None], (t,) + ring.shape)
    fs = np.broadcast_to(radius[None], (t,) + ring.shape)
    return (index.ravel(), weight.ravel(), counts, centers, np.arange(n_t) / t,
            fs.ravel(), ft.ravel())


@dataclass(frozen=True)
class SpatiotemporalSpectrum:
    """Per-clip spatiotemporal spectrum, channels averaged (output of
    :func:`spatiotemporal_power_spectrum`).

    Attributes
    ----------
    freqs : Tensor (n_rings,)
        Spatial ring centres, cycles per cell.
    temporal_freqs : Tensor (n_t,)
        Temporal bin centres ``k / t``, cycles per temporal cell.
    spatial_power : Tensor (B, n_rings)
        Power per cell in each ring, averaged over temporal frequencies.
    temporal_power : Tensor (B, n_t)
        Power per cell in each temporal bin, averaged over all spatial cells.
    power_map : Tensor (B, n_t, n_rings)
        Power per cell in each (temporal bin, spatial ring).
    ring_counts : Tensor (n_rings,)
        Spatial cells per ring (of one frame).
    temporal_counts : Tensor (n_t,)
        Temporal frequencies folded into each bin (1 or 2).
    total_power, corner_power, static_power : Tensor (B,)
        Power over all cells; over spatial corners (``|f_s| > 0.5``, in no ring); at ``f_t = 0``.
    spatial_low, spatial_moment : Tensor (B,)
        Power at ``|f_s| <= low_cutoff``; ``sum(|f_s| * power)``.
    temporal_low, temporal_moment : Tensor (B,)
        Power at ``|f_t| <= temporal_cutoff``; ``sum(|f_t| * power)``.
    zero_power : BoolTensor (B,)
        Clips with no measurable power (every other value is 0 for them).
    """

    freqs: Tensor
    temporal_freqs: Tensor
    spatial_power: Tensor
    temporal_power: Tensor
    power_map: Tensor
    ring_counts: Tensor
    temporal_counts: Tensor
    total_power: Tensor
    corner_power: Tensor
    static_power: Tensor
    spatial_low: Tensor
    spatial_moment: Tensor
    temporal_low: Tensor
    temporal_moment: Tensor
    zero_power: Tensor


def spatiotemporal_power_spectrum(x: Tensor, config: VideoSpectrumConfig = VideoSpectrumConfig(),
                                  *, dtype: torch.dtype | None = None) -> SpatiotemporalSpectrum:
    """3-D power spectrum over (t, h, w) of feature grids, reduced three ways, per clip.

    Parameters
    ----------
    x : Tensor, shape (B, C, t, h, w)
        Feature grids, time-major (frame or tubelet index first); half precision is upcast.
    config : VideoSpectrumConfig
        Windows, mean removal, binning and cutoffs (module docstring).
    dtype : torch.float32 or torch.float64, optional
        Compute precision; default float64 for float64 input, float32 otherwise.

    Returns
    -------
    SpatiotemporalSpectrum
        Power is ``|F|**2 / (mean(w_s**2) mean(w_t**2))`` with ``F`` the orthonormal 3-D FFT of
        the windowed changing part plus ``sqrt(t)`` times the 2-D FFT of the windowed static
        part at ``f_t = 0`` (module docstring). Without windows and mean removal the total
        power equals the channel mean of ``sum(x**2)`` (Parseval).
    """
    b, c, t, h, w = _check_clips(x)
    cfg = config.spectrum
    dt = _compute_dtype(x, dtype)
    _check_window_len(cfg.window, h, "rows")
    _check_window_len(cfg.window, w, "columns")
    _check_window_len(config.temporal_window, t, "temporal cells")
    index, weight, counts, centers, tfreqs, fs, ft = _st_geometry(t, h, w, cfg.binning)
    dev = x.device

    xf = x.to(dt)
    scale2 = None
    if cfg.remove_mean:
        mean = xf.mean(dim=(-2, -1), keepdim=True)
        scale2 = mean.square().mean(dim=(1, 2, 3, 4))
        xf = xf - mean
    static = xf.mean(dim=2)
    moving = xf - static[:, :, None]
    ws_power, wt_power = 1.0, 1.0
    if cfg.window == "hann":
        ws = _hann_1d(h, dev, dt)[:, None] * _hann_1d(w, dev, dt)[None, :]
        ws_power = float((ws.double() ** 2).mean())
        static = static * ws
        moving = moving * ws
    if config.temporal_window == "hann":
        wt = _hann_1d(t, dev, dt)
        wt_power = float((wt.double() ** 2).mean())
        moving = moving * wt[:, None, None]

    spec = torch.fft.rfftn(moving, dim=(-3, -2, -1), norm="ortho") / math.sqrt(wt_power)
    # f_t = 0 is the static part alone: the changing part's window-weighted mean is window
    # leakage (exactly zero without a window), and keeping it out makes a static clip exact.
    spec[:, :, 0] = torch.fft.rfft2(static, norm="ortho") * math.sqrt(t)
    pmap = (spec.real.square() + spec.imag.square()).mean(dim=1).reshape(b, -1) / ws_power

    as_t = lambda a, d=dt: torch.as_tensor(np.ascontiguousarray(a), device=dev).to(d)  # noqa
    pmap = pmap * as_t(weight)
    n_t, slots = counts.shape
    n_rings = slots - 1
    sums = pmap.new_zeros(b, n_t * slots).index_add_(1, as_t(index, torch.long), pmap)
    sums = sums.reshape(b, n_t, slots)
    total = sums.sum(dim=(1, 2))
    eps = torch.finfo(dt).eps
    zero = total <= 0
    if scale2 is not None:
        zero = zero | (total <= (t * h * w * eps) ** 2 * scale2)
    keep = (~zero).to(dt)
    sums = sums * keep[:, None, None]
    pmap = pmap * keep[:, None]

    cnt = as_t(counts)
    ring_counts = cnt[0, :n_rings]  # the DC temporal bin holds each spatial cell once
    t_counts = cnt[:, :].sum(dim=1) / (h * w)
    fs_t, ft_t = as_t(fs), as_t(ft)
    return SpatiotemporalSpectrum(
        freqs=as_t(centers, torch.float64),
        temporal_freqs=as_t(tfreqs, torch.float64),
        spatial_power=sums[:, :, :n_rings].sum(dim=1) / (ring_counts * t),
        temporal_power=sums.sum(dim=2) / (t_counts * h * w),
        power_map=sums[:, :, :n_rings] / cnt[:, :n_rings],
        ring_counts=ring_counts,
        temporal_counts=t_counts,
        total_power=total * keep,
        corner_power=sums[:, :, n_rings].sum(dim=1),
        static_power=sums[:, 0].sum(dim=1),
        spatial_low=pmap @ (fs_t <= cfg.low_cutoff).to(dt),
        spatial_moment=pmap @ fs_t,
        temporal_low=pmap @ (ft_t <= config.temporal_cutoff + 1e-12).to(dt),
        temporal_moment=pmap @ ft_t,
        zero_power=zero,
    )


_VIDEO_SUMMARIES = ("low_band_share", "centroid", "slope", "temporal_low_band_share",
                    "static_share", "temporal_centroid")


class SpatiotemporalAccumulator:
    """Running spatiotemporal spectra of many clips, mergeable across workers.

    Holds float64 sums of the per-clip spectra (and their squares, for standard errors) and
    7 float64 numbers per clip (the summaries of :meth:`result` and a has-power flag).
    """

    SUM_KEYS = ("n_clips", "spatial_sum", "spatial_sumsq", "temporal_sum", "temporal_sumsq",
                "map_sum", "corner_sum", "total_sum", "band_sum", "band_sumsq")

    def __init__(self, config: VideoSpectrumConfig = VideoSpectrumConfig(), *,
                 dtype: torch.dtype | None = None) -> None:
        if not isinstance(config, VideoSpectrumConfig):
            raise SpectrumInputError(
                f"config is a {type(config).__name__}; pass a VideoSpectrumConfig")
        self.config = config
        self.dtype = dtype
        self.grid: tuple[int, int, int] | None = None
        self._sums: dict[str, Tensor] = {}
        self._per_clip: list[Tensor] = []

    def _start(self, t: int, h: int, w: int, device) -> None:
        cfg = self.config.spectrum
        n_rings = len(_ring_geometry(h, w, cfg.binning, True)[1])
        centers = np.arange(n_rings) / max(h, w)
        lo, hi = cfg.slope_range
        n_fit = int(((centers >= lo) & (centers <= hi)).sum())
        if n_fit < 2:
            raise SpectrumInputError(
                f"a {h}x{w} spatial grid has {n_fit} ring centre(s) in slope_range "
                f"{cfg.slope_range}; widen slope_range")
        k = cfg.n_dct_bands
        if k:
            dct_band_sizes(h * w, k)
        n_t = t // 2 + 1
        z = dict(dtype=torch.float64, device=device)
        self._sums = {
            "n_clips": torch.zeros(1, **z),
            "spatial_sum": torch.zeros(n_rings, **z), "spatial_sumsq": torch.zeros(n_rings, **z),
            "temporal_sum": torch.zeros(n_t, **z), "temporal_sumsq": torch.zeros(n_t, **z),
            "map_sum": torch.zeros(n_t, n_rings, **z),
            "corner_sum": torch.zeros(1, **z), "total_sum": torch.zeros(1, **z),
            "band_sum": torch.zeros(k, **z), "band_sumsq": torch.zeros(k, **z),
        }
        self.grid = (t, h, w)

    @property
    def n_clips(self) -> int:
        return int(self._sums["n_clips"].item()) if self._sums else 0

    def update(self, x: Tensor) -> None:
        """Add clips' feature grids ``x`` (B, C, t, h, w); the grid is fixed by the first."""
        b, c, t, h, w = _check_clips(x)
        if self.grid is None:
            self._start(t, h, w, x.device)
        elif (t, h, w) != self.grid:
            raise SpectrumInputError(
                f"grid {t}x{h}x{w} differs from this accumulator's "
                f"{'x'.join(map(str, self.grid))}; use one accumulator per grid")
        cfg = self.config.spectrum
        spec = spatiotemporal_power_spectrum(x, self.config, dtype=self.dtype)
        s = self._sums
        sp, tp = spec.spatial_power.double(), spec.temporal_power.double()
        s["n_clips"] += b
        s["spatial_sum"] += sp.sum(0)
        s["spatial_sumsq"] += sp.square().sum(0)
        s["temporal_sum"] += tp.sum(0)
        s["temporal_sumsq"] += tp.square().sum(0)
        s["map_sum"] += spec.power_map.double().sum(0)
        s["corner_sum"] += spec.corner_power.double().sum()
        s["total_sum"] += spec.total_power.double().sum()
        if cfg.n_dct_bands:
            frames = x.transpose(1, 2).reshape(b * t, c, h, w)
            bands = dct_band_energy(frames, cfg.n_dct_bands, remove_mean=cfg.dct_remove_mean,
                                    dtype=self.dtype).double().reshape(b, t, -1).mean(1)
            s["band_sum"] += bands.sum(0)
            s["band_sumsq"] += bands.square().sum(0)
        total = spec.total_power
        slope = loglog_slope(spec.freqs.to(sp.dtype), sp, *cfg.slope_range)
        per = torch.stack([
            _safe_div(spec.spatial_low, total), _safe_div(spec.spatial_moment, total),
            slope.to(total.dtype), _safe_div(spec.temporal_low, total),
            _safe_div(spec.static_power, total), _safe_div(spec.temporal_moment, total),
            (~spec.zero_power).to(total.dtype)], dim=1)
        self._per_clip.append(per.double())

    def merge(self, other: "SpatiotemporalAccumulator") -> "SpatiotemporalAccumulator":
        """Add ``other``'s clips (same config and grid) to this one; returns self."""
        if other is self or not isinstance(other, SpatiotemporalAccumulator):
            raise SpectrumInputError("merge another SpatiotemporalAccumulator (not itself)")
        if other.config != self.config:
            raise SpectrumInputError("configs differ; merge only accumulators of one config")
        if other.grid is None:
            return self
        if self.grid is None:
            self._start(*other.grid, other._sums["n_clips"].device)
        elif other.grid != self.grid:
            raise SpectrumInputError(f"grids differ ({other.grid} vs {self.grid})")
        for key, value in other._sums.items():
            self._sums[key] += value.to(self._sums[key].device)
        self._per_clip.extend(other._per_clip)
        return self

    def result(self) -> dict:
        """Summary of all clips, JSON-able.

        Returns
        -------
        dict
            ``freqs`` (spatial ring centres, cycles per cell), ``ring_counts``, ``power`` (mean
            over clips of the spatial spectrum) and ``power_stderr``; ``temporal_freqs``
            (cycles per temporal cell), ``temporal_counts``, ``temporal_power`` and
            ``temporal_power_stderr``; ``power_map`` (n_t lists of n_rings); ``corner_power_share``;
            ``dct_band_energy`` (spatial zig-zag bands averaged over frames, normalised to sum 1)
            with ``dct_band_energy_stderr`` and ``dct_band_sizes``; ``summaries`` (mean over
            clips with a 95 % Student-t interval) of ``low_band_share``, ``centroid`` and
            ``slope`` (spatial, as for images), ``temporal_low_band_share``, ``static_share``
            (power at ``f_t = 0`` over all) and ``temporal_centroid`` (cycles per temporal
            cell); ``n_clips``, ``n_zero_power``, ``grid`` ([h, w], spatial),
            ``temporal_grid`` (t) and ``config``.
        """
        if self.grid is None:
            raise SpectrumInputError("this accumulator has no clips; call update() first")
        s = {k: v.detach().cpu().numpy() for k, v in self._sums.items()}
        if not all(np.isfinite(v).all() for v in s.values()):
            from .errors import NumericsError

            raise NumericsError("feature grids contained NaN or inf; check the encoder's output")
        t, h, w = self.grid
        n = float(s["n_clips"][0])
        _, _, counts, centers, tfreqs, _, _ = _st_geometry(t, h, w, self.config.spectrum.binning)
        n_rings = len(centers)
        total = float(s["total_sum"][0])
        band_mean = s["band_sum"] / n
        norm = float(band_mean.sum())
        e = band_mean / norm if norm > 0 else np.zeros_like(band_mean)
        e_err = None if n < 2 or norm <= 0 else _stderr(s["band_sum"], s["band_sumsq"], n) / norm
        values = torch.cat(self._per_clip).cpu().numpy()
        valid = values[:, -1] > 0

        def opt(a):
            return None if a is None else a.tolist()

        return {
            "freqs": centers.tolist(),
            "ring_counts": counts[0, :n_rings].astype(np.int64).tolist(),
            "power": (s["spatial_sum"] / n).tolist(),
            "power_stderr": opt(_stderr(s["spatial_sum"], s["spatial_sumsq"], n)),
            "temporal_freqs": tfreqs.tolist(),
            "temporal_counts": (counts.sum(1) / (h * w)).astype(np.int64).tolist(),
            "temporal_power": (s["temporal_sum"] / n).tolist(),
            "temporal_power_stderr": opt(_stderr(s["temporal_sum"], s["temporal_sumsq"], n)),
            "power_map": (s["map_sum"] / n).tolist(),
            "corner_power_share": float(s["corner_sum"][0]) / total if total > 0 else 0.0,
            "dct_band_energy": e.tolist(),
            "dct_band_energy_stderr": opt(e_err),
            "dct_band_sizes": dct_band_sizes(h * w, len(e)) if len(e) else [],
            "summaries": {name: _mean_interval(values[valid, i], _share_bounds(name))
                          for i, name in enumerate(_VIDEO_SUMMARIES)},
            "interval_method": _interval_note("clips"),
            "n_clips": int(n),
            "n_zero_power": int((~valid).sum()),
            "grid": [h, w],
            "temporal_grid": t,
            "config": self.config.to_dict(),
        }


def temporal_band_filter(x: Tensor, cutoff: float, band: str = "low", *,
                         transition: float = 0.0) -> Tensor:
    """Low- or high-pass along time of feature grids (B, C, t, h, w) or tokens (B, t, ...).

    Parameters
    ----------
    x : Tensor
        Time on dim 2 for 5-D grids (B, C, t, h, w), else on dim 1.
    cutoff : float
        Cycles per temporal cell; a low-pass keeps ``|f_t| <= cutoff`` (``f_t = fftfreq(t)``).
    band : {"low", "high"}
        ``high`` is the exact complement (``x - lowpass(x)``).
    transition : float
        Raised-cosine width in cycles per cell, as in :mod:`prism_probe.bands` (0: ideal).

    Returns
    -------
    Tensor
        Same shape and dtype. No window: the filter acts on the clip as one period.
    """
    from .bands import _lowpass_gain_np

    if band not in ("low", "high"):
        raise SpectrumInputError(f"band={band!r}; use 'low' or 'high'")
    dim = 2 if x.ndim == 5 else 1
    t = x.shape[dim]
    dt = _compute_dtype(x, None)
    gain = _lowpass_gain_np(np.abs(np.fft.rfftfreq(t)), float(cutoff), float(transition))
    shape = [1] * x.ndim
    shape[dim] = len(gain)
    g = torch.tensor(gain, device=x.device, dtype=dt).reshape(shape)
    low = torch.fft.irfft(torch.fft.rfft(x.to(dt), dim=dim) * g, n=t, dim=dim)
    out = low if band == "low" else x.to(dt) - low
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Token sequences


@dataclass(frozen=True)
class SequenceSpectrumConfig:
    """Settings of the 1-D token spectrum; recorded in profiles via :meth:`to_dict`.

    Parameters
    ----------
    window : {"hann", None}
        Symmetric Hann window over each sequence's valid tokens.
    remove_mean : bool
        Subtract each channel's mean over the valid tokens first.
    resolution : int
        Bins have width ``1 / resolution`` cycles per token for every sequence length (the
        frequency spacing of a ``resolution``-token sequence); ``resolution // 2 + 1`` bins.
    n_dct_bands : int
        DCT bands per sequence (0 skips them); sequences need at least this many tokens.
    dct_remove_mean : bool
        Subtract channel means before the DCT (the image default keeps them).
    low_cutoff : float
        Cycles per token of the low-band share.
    slope_range : (float, float)
        Bin centres (cycles per token) of the log-log slope fit.
    min_tokens : int
        Shorter sequences are skipped and counted (at least 3 with a Hann window, at least
        ``n_dct_bands``).
    """

    window: str | None = "hann"
    remove_mean: bool = True
    resolution: int = 64
    n_dct_bands: int = 10
    dct_remove_mean: bool = False
    low_cutoff: float = 0.125
    slope_range: tuple[float, float] = (0.05, 0.4)
    min_tokens: int = 16

    def __post_init__(self) -> None:
        # Reuse the image config's checks of the shared fields.
        SpectrumConfig(window=self.window, remove_mean=self.remove_mean,
                       n_dct_bands=self.n_dct_bands, low_cutoff=self.low_cutoff,
                       slope_range=tuple(self.slope_range))
        object.__setattr__(self, "slope_range", tuple(float(v) for v in self.slope_range))
        if not isinstance(self.resolution, int) or self.resolution < 2:
            raise SpectrumInputError(f"resolution={self.resolution!r} must be an integer >= 2")
        need = max(3 if self.window == "hann" else 2, self.n_dct_bands)
        if not isinstance(self.min_tokens, int) or self.min_tokens < need:
            raise SpectrumInputError(
                f"min_tokens={self.min_tokens!r} must be an integer >= {need} (the window and "
                "the DCT bands need that many tokens)")
        lo, hi = self.slope_range
        centres = np.arange(self.resolution // 2 + 1) / self.resolution
        if int(((centres >= lo) & (centres <= hi)).sum()) < 2:
            raise SpectrumInputError(
                f"slope_range {self.slope_range} holds fewer than 2 bin centres at resolution "
                f"{self.resolution}; widen it or raise the resolution")

    @property
    def freqs(self) -> np.ndarray:
        """Bin centres ``j / resolution``, cycles per token."""
        return np.arange(self.resolution // 2 + 1) / self.resolution

    def to_dict(self) -> dict:
        d = asdict(self)
        d["slope_range"] = list(self.slope_range)
        return d


def valid_spans(mask: Tensor) -> list[Tensor]:
    """Indices of the valid tokens of each sequence, in order.

    Parameters
    ----------
    mask : BoolTensor (B, L)
        True for tokens to measure: the attention mask with special tokens (CLS, SEP, BOS,
        EOS, language codes) cleared.

    Returns
    -------
    list of LongTensor
        One per sequence. Valid tokens need not be contiguous (a SEP between two segments is
        dropped and the segments are joined).
    """
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise SpectrumInputError(f"mask must be a (B, L) bool tensor, got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
    return [torch.nonzero(row, as_tuple=False).flatten() for row in mask]


@lru_cache(maxsize=512)
def _token_bins(n: int, resolution: int):
    k = np.arange(n // 2 + 1, dtype=np.int64)
    # Smallest j >= 0 with k/n <= (2j + 1) / (2N): ceil((2kN - n) / (2n)), in integers.
    j = np.maximum(0, -((n - 2 * k * resolution) // (2 * n)))
    weight = np.full(len(k), 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    return j, weight, k / n


@dataclass(frozen=True)
class TokenSpectrum:
    """Per-sequence 1-D spectra (output of :func:`token_power_spectrum`).

    Attributes
    ----------
    freqs : ndarray (n_bins,)
        Bin centres, cycles per token.
    power : Tensor (S, n_bins)
        Mean power per frequency cell in each bin (0 where a sequence has no cell there).
    present : BoolTensor (S, n_bins)
        Whether each sequence has a frequency in each bin.
    total_power, low_power, freq_moment : Tensor (S,)
        Over all frequencies of each sequence; ``|f| <= low_cutoff``; ``sum(|f| * power)``.
    band_energy : Tensor (S, K)
        DCT band energy per token (module docstring).
    lengths : LongTensor (S,)
        Valid tokens measured per sequence.
    index : LongTensor (S,)
        Row of the batch each measured sequence came from (short ones are left out).
    zero_power : BoolTensor (S,)
    n_short : int
        Sequences skipped for having fewer than ``min_tokens`` valid tokens.
    """

    freqs: np.ndarray
    power: Tensor
    present: Tensor
    total_power: Tensor
    low_power: Tensor
    freq_moment: Tensor
    band_energy: Tensor
    lengths: Tensor
    index: Tensor
    zero_power: Tensor
    n_short: int


def token_power_spectrum(x: Tensor, mask: Tensor,
                         config: SequenceSpectrumConfig = SequenceSpectrumConfig(), *,
                         dtype: torch.dtype | None = None) -> TokenSpectrum:
    """1-D power spectrum along the token axis of hidden states, per sequence.

    Parameters
    ----------
    x : Tensor (B, L, C)
        Hidden states (tokens × channels).
    mask : BoolTensor (B, L)
        Tokens to measure (see :func:`valid_spans`); the rest never enter any number.
    config : SequenceSpectrumConfig

    Returns
    -------
    TokenSpectrum
        Power ``|rfft(w * (x - mean), norm="ortho")|**2 / mean(w**2)`` per frequency ``k / n``,
        averaged over channels, binned as the module docstring says. Without window and mean
        removal the total power equals the channel mean of ``sum(x**2)`` over valid tokens.
    """
    if not isinstance(x, Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise SpectrumInputError(
            f"x must be a floating tensor (B, L, C), got {getattr(x, 'shape', type(x).__name__)}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise SpectrumInputError(f"mask {tuple(mask.shape)} must match x's (B, L) "
                                 f"{tuple(x.shape[:2])}")
    dt = _compute_dtype(x, dtype)
    dev = x.device
    n_bins = config.resolution // 2 + 1
    k_bands = config.n_dct_bands
    spans = valid_spans(mask.to(dev))
    groups: dict[int, list[int]] = {}
    n_short = 0
    for i, span in enumerate(spans):
        n = int(span.numel())
        if n < config.min_tokens:
            n_short += 1
            continue
        groups.setdefault(n, []).append(i)

    rows: list[tuple] = []
    for n, members in sorted(groups.items()):
        seq = torch.stack([x[i, spans[i]] for i in members]).to(dt)  # (G, n, C)
        scale2 = None
        if config.remove_mean:
            mean = seq.mean(dim=1, keepdim=True)
            scale2 = mean.square().mean(dim=(1, 2))
            centred = seq - mean
        else:
            centred = seq
        w_power = 1.0
        windowed = centred
        if config.window == "hann":
            win = _hann_1d(n, dev, dt)
            w_power = float((win.double() ** 2).mean())
            windowed = centred * win[None, :, None]
        spec = torch.fft.rfft(windowed, dim=1, norm="ortho")
        p = (spec.real.square() + spec.imag.square()).mean(dim=2) / w_power  # (G, n//2+1)
        j, weight, f = _token_bins(n, config.resolution)
        pw = p * torch.tensor(weight, device=dev, dtype=dt)
        jt = torch.tensor(j, device=dev)
        sums = pw.new_zeros(len(members), n_bins).index_add_(1, jt, pw)
        cnt = torch.zeros(n_bins, dtype=dt, device=dev).index_add_(
            0, jt, torch.tensor(weight, device=dev, dtype=dt))
        total = pw.sum(dim=1)
        eps = torch.finfo(dt).eps
        zero = total <= 0
        if scale2 is not None:
            zero = zero | (total <= (n * eps) ** 2 * scale2)
        keep = (~zero).to(dt)
        ft = torch.tensor(f, device=dev, dtype=dt)
        if k_bands:
            d = dct_matrix(n, device=dev, dtype=dt)
            src = seq - seq.mean(dim=1, keepdim=True) if config.dct_remove_mean else seq
            energy = torch.einsum("kn,gnc->gkc", d, src).square().mean(dim=2) / n
            band = torch.tensor(np.repeat(np.arange(k_bands), dct_band_sizes(n, k_bands)),
                                device=dev)
            bands = energy.new_zeros(len(members), k_bands).index_add_(1, band, energy)
        else:
            bands = pw.new_zeros(len(members), 0)
        rows.append((members, _safe_div(sums, cnt.expand_as(sums)) * keep[:, None],
                     (cnt > 0).expand(len(members), -1), total * keep,
                     (pw @ (ft <= config.low_cutoff + 1e-12).to(dt)) * keep,
                     (pw @ ft) * keep, bands, n, zero))

    if not rows:
        empty = torch.zeros(0, n_bins, dtype=dt, device=dev)
        z = torch.zeros(0, dtype=dt, device=dev)
        return TokenSpectrum(config.freqs, empty, empty.bool(), z, z, z,
                             torch.zeros(0, k_bands, dtype=dt, device=dev),
                             torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                             torch.zeros(0, dtype=torch.bool, device=dev), n_short)
    order = [i for r in rows for i in r[0]]
    lengths = [r[7] for r in rows for _ in r[0]]
    cat = [torch.cat([r[k] for r in rows]) for k in (1, 2, 3, 4, 5, 6, 8)]
    perm = torch.argsort(torch.tensor(order))  # back to batch order
    cat = [c[perm.to(c.device)] for c in cat]
    return TokenSpectrum(config.freqs, cat[0], cat[1], cat[2], cat[3], cat[4], cat[5],
                         torch.tensor(lengths)[perm], torch.tensor(order)[perm], cat[6], n_short)


_SEQ_SUMMARIES = ("low_band_share", "centroid", "slope")


def _share_bounds(name: str) -> tuple[float, float] | None:
    """Shares cannot leave [0, 1], although a t interval over a few clips can."""
    return (0.0, 1.0) if name.endswith("share") else None


class TokenSpectrumAccumulator:
    """Running 1-D spectra of many sequences (one layer), mergeable across workers."""

    def __init__(self, config: SequenceSpectrumConfig = SequenceSpectrumConfig(), *,
                 dtype: torch.dtype | None = None) -> None:
        if not isinstance(config, SequenceSpectrumConfig):
            raise SpectrumInputError(
                f"config is a {type(config).__name__}; pass a SequenceSpectrumConfig")
        self.config = config
        self.dtype = dtype
        n_bins, k = config.resolution // 2 + 1, config.n_dct_bands
        z = dict(dtype=torch.float64)
        self._sums = {"n_sequences": torch.zeros(1, **z), "n_short": torch.zeros(1, **z),
                      "power_sum": torch.zeros(n_bins, **z),
                      "power_sumsq": torch.zeros(n_bins, **z),
                      "bin_sequences": torch.zeros(n_bins, **z),
                      "total_sum": torch.zeros(1, **z), "band_sum": torch.zeros(k, **z),
                      "band_sumsq": torch.zeros(k, **z)}
        self._per_seq: list[Tensor] = []

    @property
    def n_sequences(self) -> int:
        return int(self._sums["n_sequences"].item())

    def update(self, x: Tensor, mask: Tensor) -> None:
        """Add a batch of hidden states ``x`` (B, L, C) with its validity ``mask`` (B, L)."""
        spec = token_power_spectrum(x, mask, self.config, dtype=self.dtype)
        self.add(spec)

    def add(self, spec: TokenSpectrum) -> None:
        """Add an already computed :class:`TokenSpectrum`."""
        s = self._sums
        s["n_short"] += spec.n_short
        if spec.power.shape[0] == 0:
            return
        p = spec.power.double().cpu()
        s["n_sequences"] += p.shape[0]
        s["power_sum"] += p.sum(0)
        s["power_sumsq"] += p.square().sum(0)
        s["bin_sequences"] += spec.present.double().cpu().sum(0)
        s["total_sum"] += spec.total_power.double().cpu().sum()
        b = spec.band_energy.double().cpu()
        s["band_sum"] += b.sum(0)
        s["band_sumsq"] += b.square().sum(0)
        total = spec.total_power.double().cpu()
        freqs = torch.tensor(spec.freqs, dtype=torch.float64)
        slope = loglog_slope(freqs, p, *self.config.slope_range)
        self._per_seq.append(torch.stack([
            _safe_div(spec.low_power.double().cpu(), total),
            _safe_div(spec.freq_moment.double().cpu(), total), slope,
            (~spec.zero_power.cpu()).double(), spec.lengths.double()], dim=1))

    def merge(self, other: "TokenSpectrumAccumulator") -> "TokenSpectrumAccumulator":
        """Add ``other``'s sequences (same config) to this one; returns self."""
        if other is self or other.config != self.config:
            raise SpectrumInputError("merge another accumulator of the same config")
        for key, value in other._sums.items():
            self._sums[key] += value
        self._per_seq.extend(other._per_seq)
        return self

    def result(self) -> dict:
        """Summary of all sequences, JSON-able.

        Returns
        -------
        dict
            ``freqs`` (bin centres, cycles per token), ``power`` (per bin, mean over the
            sequences that have a frequency there), ``power_stderr``, ``bin_sequences``;
            ``dct_band_energy`` (normalised to sum 1), its ``dct_band_energy_stderr``;
            ``summaries`` of ``low_band_share``, ``centroid`` (cycles per token) and ``slope``
            (mean over sequences, 95 % Student-t interval); ``n_sequences``, ``n_short``
            (skipped), ``n_zero_power``, ``tokens`` (min, median, max valid length), ``config``.
        """
        s = {k: v.numpy() for k, v in self._sums.items()}
        n = float(s["n_sequences"][0])
        if n == 0:
            raise SpectrumInputError(
                f"no sequence had {self.config.min_tokens} or more valid tokens "
                f"({int(s['n_short'][0])} too short); lower min_tokens or use longer inputs")
        have = s["bin_sequences"]
        safe = np.maximum(have, 1)
        mean = np.where(have > 0, s["power_sum"] / safe, 0.0)
        var = np.maximum(s["power_sumsq"] - s["power_sum"] ** 2 / safe, 0) / np.maximum(have - 1, 1)
        se = np.where(have > 1, np.sqrt(var / safe), 0.0)
        band_mean = s["band_sum"] / n
        norm = float(band_mean.sum())
        e = band_mean / norm if norm > 0 else np.zeros_like(band_mean)
        e_err = None if n < 2 or norm <= 0 else _stderr(s["band_sum"], s["band_sumsq"], n) / norm
        values = torch.cat(self._per_seq).numpy()
        valid = values[:, 3] > 0
        lengths = values[:, 4]
        return {
            "freqs": self.config.freqs.tolist(),
            "power": mean.tolist(),
            "power_stderr": se.tolist() if n > 1 else None,
            "bin_sequences": have.astype(np.int64).tolist(),
            "dct_band_energy": e.tolist(),
            "dct_band_energy_stderr": None if e_err is None else e_err.tolist(),
            "summaries": {name: _mean_interval(values[valid, i], _share_bounds(name))
                          for i, name in enumerate(_SEQ_SUMMARIES)},
            "interval_method": _interval_note("sequences"),
            "n_sequences": int(n),
            "n_short": int(s["n_short"][0]),
            "n_zero_power": int((~valid).sum()),
            "tokens": [int(lengths.min()), float(np.median(lengths)), int(lengths.max())],
            "config": self.config.to_dict(),
        }


def token_band_filter(x: Tensor, mask: Tensor, cutoff: float, band: str = "low", *,
                      transition: float = 0.0) -> Tensor:
    """Low- or high-pass of hidden states along each sequence's valid tokens.

    Parameters
    ----------
    x : Tensor (B, L, C)
    mask : BoolTensor (B, L)
        Valid tokens; the others (special tokens, padding) are returned unchanged.
    cutoff : float
        Cycles per token; the low-pass keeps ``f = k / n <= cutoff`` of each valid span of
        length ``n`` (no window: the span is treated as one period).
    band : {"low", "high"}
    transition : float
        Raised-cosine width in cycles per token (0: ideal).

    Returns
    -------
    Tensor (B, L, C), same dtype.
    """
    from .bands import _lowpass_gain_np

    if band not in ("low", "high"):
        raise SpectrumInputError(f"band={band!r}; use 'low' or 'high'")
    out = x.clone()
    for i, span in enumerate(valid_spans(mask.to(x.device))):
        n = int(span.numel())
        if n < 2:
            continue
        seq = x[i, span].to(_compute_dtype(x, None))
        gain = _lowpass_gain_np(np.fft.rfftfreq(n), float(cutoff), float(transition))
        g = torch.tensor(gain, device=x.device, dtype=seq.dtype)[:, None]
        low = torch.fft.irfft(torch.fft.rfft(seq, dim=0) * g, n=n, dim=0)
        out[i, span] = (low if band == "low" else seq - low).to(x.dtype)
    return out
