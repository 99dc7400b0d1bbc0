"""Image quality metrics for reconstructions: PSNR and SSIM, batched, in torch.

The one implementation in the project (latent ablation and UAE evaluation both use it). Images
are (B, C, H, W) tensors with values in [0, 1] (data range 1); both metrics are returned per
image, so callers can average or bootstrap them.

SSIM follows Wang et al. (2004): an 11 × 11 Gaussian window with σ = 1.5 pixels, constants
``K1 = 0.01`` and ``K2 = 0.03``, population (not sample) variances, computed per channel over
the positions where the window lies wholly inside the image, then averaged over positions and
channels. This is what ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1)`` computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import NumericsError

__all__ = ["psnr", "ssim", "mse"]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: Tensor, y: Tensor, min_side: int = 1) -> None:
    if x.shape != y.shape:
        raise NumericsError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}; "
                            "compare reconstructions with images of the same size")
    if x.ndim != 4:
        raise NumericsError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < min_side:
        raise NumericsError(f"images of {x.shape[-2]}×{x.shape[-1]} px are smaller than the "
                            f"{min_side}×{min_side} SSIM window; use images of at least "
                            f"{min_side} px")


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per image.

    Parameters
    ----------
    x, y : Tensor, shape (B, C, H, W)
        Images in the same units.

    Returns
    -------
    Tensor, shape (B,)
        Mean of ``(x - y)**2`` over channels and pixels, in float64.
    """
    _check_pair(x, y)
    d = x.double() - y.double()
    return d.square().mean(dim=(1, 2, 3))


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    Parameters
    ----------
    x, y : Tensor, shape (B, C, H, W)
        Reconstruction and reference, values in [0, ``data_range``].
    data_range : float
        The peak value (1 for images in [0, 1]).

    Returns
    -------
    Tensor, shape (B,)
        ``10 · log10(data_range² / MSE)`` in float64; ``inf`` for identical images.
    """
    if not data_range > 0:
        raise NumericsError(f"data_range={data_range!r} must be > 0 (1 for images in [0, 1])")
    err = mse(x, y)
    return 10.0 * torch.log10(data_range ** 2 / err)


def _gaussian_window(size: int, sigma: float, device, dtype) -> Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, *, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> Tensor:
    """Structural similarity per image (Wang et al. 2004; conventions in the module docstring).

    Parameters
    ----------
    x, y : Tensor, shape (B, C, H, W)
        Reconstruction and reference, values in [0, ``data_range``]; H and W at least ``window``.
    data_range : float
        The peak value (1 for images in [0, 1]); sets ``C1 = (K1·L)²`` and ``C2 = (K2·L)²``.
    window : int
        Side of the Gaussian window in pixels (odd).
    sigma : float
        Standard deviation of the Gaussian window in pixels.

    Returns
    -------
    Tensor, shape (B,)
        Mean SSIM over valid window positions and channels, in float64; 1 for identical images.
    """
    if window % 2 != 1 or window < 3:
        raise NumericsError(f"SSIM window={window} must be an odd number of pixels >= 3")
    _check_pair(x, y, min_side=window)
    b, c, _, _ = x.shape
    xd, yd = x.double(), y.double()
    g = _gaussian_window(window, sigma, xd.device, xd.dtype)

    def blur(t: Tensor) -> Tensor:
        # Separable valid convolution of every channel with the Gaussian window.
        t = t.reshape(b * c, 1, *t.shape[-2:])
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        t = F.conv2d(t, g.view(1, 1, -1, 1))
        return t.reshape(b, c, *t.shape[-2:])

    mx, my = blur(xd), blur(yd)
    vx = blur(xd * xd) - mx * mx
    vy = blur(yd * yd) - my * my
    cxy = blur(xd * yd) - mx * my
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.mean(dim=(1, 2, 3))

