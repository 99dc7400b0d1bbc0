"""Frequency bands of feature maps: low-, high- and band-pass filters and exact band splits.

One module for every band operation of the toolkit (ablation probes, the UAE model). Maps are
shaped ``(B, C, h, w)``; cutoffs are in cycles per grid cell, so they mean the same on any grid,
square or not. Everything is batched torch on the input's device and differentiable; half
precision is computed in float32 and returned in the input's dtype.

Domains
-------
``"fft"``
    Radial frequency ``|f| = hypot(fftfreq(h), fftfreq(w))`` of each ``rfft2`` cell, as in
    :mod:`prism_probe.spectra`; ``|f|`` reaches ``sqrt(2)/2`` in the corners. The gain is real
    and depends on ``|f|`` only, so filtered maps stay real. This is UAE v1's ring split.
``"dct"``
    Orthonormal 2-D DCT-II coefficient ``(u, v)`` has frequency ``(u / 2h, v / 2w)`` cycles per
    cell, radius ``hypot(u / 2h, v / 2w)`` (below ``sqrt(2)/2``). A cutoff selects the
    coefficients by that radius. Cosines on the DCT's even extension have no wrap-around edge,
    so no window is needed.
``"zigzag"`` (:func:`split_bands` only; and :func:`keep_first_dct`)
    The first K DCT coefficients in JPEG zig-zag order, K an integer count: UAE v5's bands.

Gains
-----
A low-pass at cutoff ``c`` keeps ``|f| <= c`` (cells within 1e-12 of ``c`` count as inside, so a
cutoff given as a decimal still keeps the cell it names). With ``transition = t > 0`` the gain
falls as a raised cosine from 1 at ``c - t/2`` to 0 at ``c + t/2``, 0.5 at ``c``. A high-pass
has gain ``1 - lowpass``; a band-pass ``(lo, hi]`` has ``lowpass(hi) - lowpass(lo)``. A
low-pass whose gain is 1 on every cell (ideal mask with ``c >= sqrt(2)/2``, or
``c - t/2 >= sqrt(2)/2``) returns the input unchanged.
"""

from __future__ import annotations

import math
from functools import lru_cache
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from prism_probe.spectra import (
    SpectrumInputError,
    _check_maps,
    _compute_dtype,
    _zigzag_np,
    dct2,
    idct2,
)

__all__ = [
    "DOMAINS",
    "MAX_RADIUS",
    "band_gain",
    "lowpass",
    "highpass",
    "bandpass",
    "keep_first_dct",
    "split_bands",
]

DOMAINS = ("fft", "dct")
MAX_RADIUS = math.sqrt(2.0) / 2  # |f| of the spectrum's corner (0.5, 0.5)
_EDGE_TOL = 1e-12


# ------------------------------------------------------------------------------------------------
# Checks


def _check_domain(domain: str, allowed=DOMAINS) -> None:
    if domain not in allowed:
        raise SpectrumInputError(f"domain={domain!r} is unknown; use one of {list(allowed)}")


def _check_cutoff(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
        raise SpectrumInputError(
            f"{name}={value!r} must be a number >= 0 in cycles per cell (Nyquist is 0.5)"
        )
    return float(value)


# ------------------------------------------------------------------------------------------------
# Gains


@lru_cache(maxsize=64)
def _radius_np(h: int, w: int, domain: str) -> np.ndarray:
    if domain == "fft":
        fy = np.fft.fftfreq(h)[:, None]
        fx = np.arange(w // 2 + 1)[None, :] / w  # rfft2 columns
    else:
        fy = np.arange(h)[:, None] / (2 * h)
        fx = np.arange(w)[None, :] / (2 * w)
    return np.hypot(fy, fx)


def _lowpass_gain_np(radius: np.ndarray, cutoff: float, transition: float) -> np.ndarray:
    if transition == 0:
        return (radius <= cutoff + _EDGE_TOL).astype(np.float64)
    z = np.clip((radius - (cutoff - transition / 2)) / transition, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * z))


def _gain_np(h: int, w: int, lo: float | None, hi: float | None, domain: str,
             transition: float) -> np.ndarray:
    radius = _radius_np(h, w, domain)
    upper = np.ones_like(radius) if hi is None else _lowpass_gain_np(radius, hi, transition)
    lower = np.zeros_like(radius) if lo is None else _lowpass_gain_np(radius, lo, transition)
    # Overlapping transitions of a narrow band-pass could go below 0.
    return np.clip(upper - lower, 0.0, 1.0)


@lru_cache(maxsize=128)
def _gain(h: int, w: int, lo: float | None, hi: float | None, domain: str, transition: float,
          device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(_gain_np(h, w, lo, hi, domain, transition), device=device, dtype=dtype)


def band_gain(h: int, w: int, lo: float | None, hi: float | None, domain: str = "fft",
              transition: float = 0.0, *, device=None, dtype=None) -> Tensor:
    """Gain of the pass band ``(lo, hi]`` on every transform cell.

    Parameters
    ----------
    h, w : int
        Grid size.
    lo, hi : float or None
        Band edges in cycles per cell; ``lo=None`` is a low-pass at ``hi``, ``hi=None`` a
        high-pass at ``lo``.
    domain : {"fft", "dct"}
    transition : float
        Width in cycles per cell of the raised-cosine edges (0: ideal masks).

    Returns
    -------
    Tensor, shape (h, w // 2 + 1) for "fft" (``rfft2`` layout), (h, w) for "dct"
        Gains in [0, 1].
    """
    _check_domain(domain)
    if h < 1 or w < 1:
        raise SpectrumInputError(f"grid {h}x{w}; both sides must be >= 1")
    lo = None if lo is None else _check_cutoff(lo, "lo")
    hi = None if hi is None else _check_cutoff(hi, "hi")
    transition = _check_cutoff(transition, "transition")
    gain = _gain_np(h, w, lo, hi, domain, transition)
    return torch.tensor(gain, device=device, dtype=dtype or torch.float32)


# ------------------------------------------------------------------------------------------------
# Filters


def _apply(x: Tensor, lo: float | None, hi: float | None, domain: str,
           transition: float) -> Tensor:
    """Apply the band gain to float32/float64 maps ``x`` (already checked)."""
    h, w = x.shape[-2:]
    gain = _gain(h, w, lo, hi, domain, transition, x.device, x.dtype)
    if domain == "fft":
        return torch.fft.irfft2(torch.fft.rfft2(x) * gain, s=(h, w))
    return idct2(dct2(x) * gain)


@lru_cache(maxsize=128)
def _is_identity(h: int, w: int, lo, hi, domain: str, transition: float) -> bool:
    return lo is None and hi is not None and bool(
        np.all(_gain_np(h, w, None, hi, domain, transition) == 1.0)
    )


def _filter(x: Tensor, lo, hi, domain: str, transition: float,
            names: tuple[str, str] = ("lo", "hi")) -> Tensor:
    _check_maps(x)
    _check_domain(domain)
    lo = None if lo is None else _check_cutoff(lo, names[0])
    hi = None if hi is None else _check_cutoff(hi, names[1])
    transition = _check_cutoff(transition, "transition")
    if lo is not None and hi is not None and not lo < hi:
        raise SpectrumInputError(f"band ({lo}, {hi}] is empty; pass lo < hi")
    h, w = x.shape[-2:]
    if _is_identity(h, w, lo, hi, domain, transition):
        return x.clone()
    xf = x.to(_compute_dtype(x, None))
    return _apply(xf, lo, hi, domain, transition).to(x.dtype)


def lowpass(x: Tensor, cutoff: float, domain: str = "fft", transition: float = 0.0) -> Tensor:
    """Keep frequencies ``|f| <= cutoff`` (cycles per cell).

    Parameters
    ----------
    x : Tensor, shape (B, C, h, w)
    cutoff : float
        Cycles per cell; ``>= sqrt(2)/2`` (with an ideal mask) keeps everything.
    domain : {"fft", "dct"}
        See the module docstring.
    transition : float
        Raised-cosine width in cycles per cell, centred on the cutoff (gain 0.5 there).

    Returns
    -------
    Tensor, same shape and dtype as ``x``.
    """
    return _filter(x, None, cutoff, domain, transition, ("lo", "cutoff"))


def highpass(x: Tensor, cutoff: float, domain: str = "fft", transition: float = 0.0) -> Tensor:
    """Keep frequencies ``|f| > cutoff``; gain ``1 - lowpass`` (arguments as :func:`lowpass`).
    ``lowpass(x, c) + highpass(x, c)`` equals ``x`` to float precision."""
    return _filter(x, cutoff, None, domain, transition, ("cutoff", "hi"))


def bandpass(x: Tensor, lo: float, hi: float, domain: str = "fft",
             transition: float = 0.0) -> Tensor:
    """Keep ``lo < |f| <= hi``; gain ``lowpass(hi) - lowpass(lo)`` clipped to [0, 1]
    (arguments as :func:`lowpass`)."""
    return _filter(x, lo, hi, domain, transition)


@lru_cache(maxsize=64)
def _zigzag_rank(h: int, w: int, device: torch.device) -> Tensor:
    rank = np.empty(h * w, dtype=np.int64)
    rank[_zigzag_np(h, w)] = np.arange(h * w)
    return torch.from_numpy(rank.reshape(h, w)).to(device)


def keep_first_dct(x: Tensor, k: int | Tensor) -> Tensor:
    """Keep the first ``k`` DCT coefficients in zig-zag order, zero the rest, invert.

    Parameters
    ----------
    x : Tensor, shape (B, C, h, w)
    k : int or LongTensor of shape (B,)
        Coefficients kept, ``0 .. h*w``; a tensor gives one count per image (UAE v5's
        frequency-masked prediction, ``K ~ U[K_min, h*w]``).

    Returns
    -------
    Tensor, same shape and dtype as ``x``
        ``idct2(dct2(x) * mask)``, mask 1 on the first ``k`` zig-zag positions (orthonormal
        DCT-II, no window); ``k = h*w`` returns ``x`` to float precision.
    """
    b, _, h, w = _check_maps(x)
    n = h * w
    if isinstance(k, Tensor):
        if k.shape != (b,) or k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise SpectrumInputError(
                f"k has shape {tuple(k.shape)} and dtype {k.dtype}; pass an int or a LongTensor "
                f"of shape ({b},)"
            )
        kk = k.to(x.device)
    elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        kk = torch.full((b,), int(k), device=x.device, dtype=torch.long)
    else:
        raise SpectrumInputError(f"k={k!r}; pass an int or a LongTensor of shape ({b},)")
    # Bounds of a tensor need a device sync; a wrong count would silently mean "keep all".
    if int(kk.min()) < 0 or int(kk.max()) > n:
        raise SpectrumInputError(
            f"k must lie in 0..{n} (the {h}x{w} grid's coefficients), got "
            f"{int(kk.min())}..{int(kk.max())}"
        )
    xf = x.to(_compute_dtype(x, None))
    mask = (_zigzag_rank(h, w, x.device)[None] < kk[:, None, None]).to(xf.dtype)
    return idct2(dct2(xf) * mask[:, None]).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Splits


def _check_edges(edges, domain: str, n_coefficients: int) -> list:
    edges = list(edges)
    if domain == "zigzag":
        bad = [e for e in edges if isinstance(e, bool) or not isinstance(e, (int, np.integer))]
        if bad or any(not 0 < e < n_coefficients for e in edges):
            raise SpectrumInputError(
                f"edges={edges} must be integer coefficient counts in 1..{n_coefficients - 1} "
                "for domain='zigzag'"
            )
        edges = [int(e) for e in edges]
    else:
        edges = [_check_cutoff(e, "edge") for e in edges]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise SpectrumInputError(f"edges={edges} must be strictly increasing")
    return edges


def split_bands(x: Tensor, edges, domain: str = "fft", transition: float = 0.0) -> list[Tensor]:
    """Split maps into ``len(edges) + 1`` bands that sum back to the input.

    Parameters
    ----------
    x : Tensor, shape (B, C, h, w)
    edges : sequence
        Increasing band edges: cycles per cell for ``"fft"`` and ``"dct"``; integer zig-zag
        coefficient counts for ``"zigzag"`` (band k holds zig-zag positions
        ``edges[k-1] .. edges[k] - 1``).
    domain : {"fft", "dct", "zigzag"}
    transition : float
        Raised-cosine width of each edge, cycles per cell (``"fft"``/``"dct"`` only).

    Returns
    -------
    list of Tensor, each shaped like ``x``, low band first
        Residual split (as UAE v1): ``band_k = P_k(residual)``, ``residual -= band_k`` with
        ``P_k`` the band-pass ``(edges[k-1], edges[k]]`` (a low-pass for k = 0); the last band is
        the final residual, so the bands sum to ``x`` to float precision whatever the
        transition. With ideal masks ``band_k`` is exactly the band-pass of ``x``.
    """
    _, _, h, w = _check_maps(x)
    _check_domain(domain, ("fft", "dct", "zigzag"))
    transition = _check_cutoff(transition, "transition")
    if domain == "zigzag" and transition:
        raise SpectrumInputError("transition must be 0 for domain='zigzag' (hard counts)")
    edges = _check_edges(edges, domain, h * w)

    xf = x.to(_compute_dtype(x, None))
    residual = xf
    bands = []
    lower = None
    for edge in edges:  # a handful of bands; each step is one batched transform pair
        if domain == "zigzag":
            rank = _zigzag_rank(h, w, x.device)
            keep = ((rank >= (lower or 0)) & (rank < edge)).to(xf.dtype)
            band = idct2(dct2(residual) * keep)
        else:
            band = _apply(residual, lower, edge, domain, transition)
        bands.append(band)
        residual = residual - band
        lower = edge
    bands.append(residual)
    return [band.to(x.dtype) for band in bands]
