"""Evaluating a trained UAE: PSNR, SSIM, Fréchet distance, band-wise reconstructions.

``prism-probe eval-uae RUN --images DIR`` loads the run's EMA weights and reports, over the
images (shorter side resized to the run's image size, centre crop):

- PSNR (dB) and SSIM of the reconstructions (:mod:`prism_probe.metrics`, data range 1);
- the Fréchet distance between real and reconstructed images in the feature space of a
  registered encoder (globally average-pooled feature map), by the closed form for two
  Gaussians. The registry has no Inception network, so this is not rFID; the encoder used is
  named in the output (default: the run's own encoder, e.g. resnet56-cifar). Values from
  different feature encoders are not comparable, and with fewer images than feature channels
  the covariances are singular and the distance is biased upwards;
- band-wise reconstructions: decode from band 0 alone, then bands 0…1, 0…2, …, with the PSNR
  of each, and a grid image (rows: originals, then each cumulative band set).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import PrismError
from ..metrics import psnr, ssim

log = logging.getLogger("prism_probe")

__all__ = ["psnr", "ssim", "frechet_distance", "gaussian_stats", "load_run", "band_recons",
           "evaluate_run", "format_results"]


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) of features (N, D), float64, unbiased (N − 1)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise PrismError(f"Fréchet statistics need (N >= 2, D) features, got "
                         f"{tuple(features.shape)}; use more images")
    f = features.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrtm_psd(a: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((a + a.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, cov1) and N(mu2, cov2).

    ``‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1^½ Σ2 Σ1^½)^½)``, computed in float64 with
    symmetric eigen-decompositions (the matrix inside the trace is symmetric positive
    semi-definite, so no complex square roots arise; tiny negative eigenvalues from rounding
    are clamped to 0). Units: squared feature units.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1),) * 2:
        raise PrismError(f"Fréchet distance: shapes {tuple(mu1.shape)}, {tuple(cov1.shape)}, "
                         f"{tuple(mu2.shape)}, {tuple(cov2.shape)} do not match")
    s1 = _sqrtm_psd(cov1)
    inner = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt
    return float(value.clamp_min(0))


def load_run(run: str | Path, *, device="cpu", use_ema: bool = True):
    """A trained UAE from its run folder, weights from the last committed checkpoint.

    The encoder is built with random weights (the checkpoint holds the trained ones), so
    loading needs no teacher weights. Returns ``(model, config, checkpoint_record)``; the model
    is in eval mode without its teacher.
    """
    from .model import build_uae
    from .train import load_checkpoint_tensors, load_weights_into, read_checkpoint

    run = Path(run)
    try:
        saved = json.loads((run / "config.json").read_text())
    except OSError:
        raise PrismError(f"{run}: no config.json; name a folder written by "
                         "`prism-probe train-uae --out RUN`") from None
    except json.JSONDecodeError as exc:
        raise PrismError(f"{run / 'config.json'}: damaged ({exc.msg} at line {exc.lineno}); "
                         "restore it from the run's copy or retrain") from None
    if not isinstance(saved, dict) or "config" not in saved:
        raise PrismError(f"{run / 'config.json'}: not a UAE run config (no 'config' field)")
    record = read_checkpoint(run)
    cfg = saved["config"]
    model = build_uae(cfg, device=device, teacher=False, random_encoder=True)
    load_weights_into(model, load_checkpoint_tensors(run, record["weights"]), use_ema=use_ema)
    return model.eval().requires_grad_(False), cfg, record


@torch.no_grad()
def band_recons(model, x: Tensor) -> list[Tensor]:
    """Reconstructions from band 0, bands 0…1, …, all bands: list of K (B, 3, H, W) in [0, 1]."""
    parts = model.modulator.split(model.encode(x))
    out, acc = [], torch.zeros_like(parts[0])
    for p in parts:
        acc = acc + p
        out.append(model.decode(acc).float().clamp(0, 1))
    return out


def _pooled(encoder, x01: Tensor) -> Tensor:
    from .model import TokenGridEncoder

    net = encoder if isinstance(encoder, TokenGridEncoder) else None
    if net is None:
        raise PrismError("internal: Fréchet features need a TokenGridEncoder")
    return net(x01).float().mean(dim=(-2, -1))


@torch.no_grad()
def evaluate_run(run, images=None, *, fd_encoder: str | None = None, weights_dir=None,
                 limit: int | None = None, batch_size: int = 64, out=None,
                 device="auto") -> dict[str, Any]:
    """Evaluate a run (see the module docstring). Returns a JSON-able dict."""
    from ..data import Preprocess, collect_images, read_image
    from ..loading import load_encoder, resolve_device
    from .model import TokenGridEncoder
    from .train import _resolve_path

    dev = resolve_device(device)
    model, cfg, record = load_run(run, device=dev)
    source = images if images is not None else _resolve_path(cfg["data"].get("val"))
    image_list = collect_images(source, limit=limit, seed=0)
    size = int(cfg["image_size"])
    pre = Preprocess(size=size, resize="shorter", value_range=(0.0, 1.0))
    fd_name = fd_encoder or str(cfg["encoder"]["name"])
    wdirs = weights_dir or ([_resolve_path(cfg.get("weights_dir"))]
                            if cfg.get("weights_dir") else None)
    fd_loaded = load_encoder(fd_name, weights_dir=wdirs, device=dev)
    fd_net = TokenGridEncoder(fd_loaded, fd_loaded.preprocess.size)

    ps, ss, real_f, fake_f = [], [], [], []
    band_ps: list[list[Tensor]] = []
    first = None
    paths = list(image_list.paths)
    for i in range(0, len(paths), batch_size):
        x = torch.stack([pre(read_image(p)) for p in paths[i:i + batch_size]]).to(dev)
        recons = band_recons(model, x)
        y = recons[-1]
        ps.append(psnr(y, x))
        if size >= 11:
            ss.append(ssim(y, x))
        band_ps.append([psnr(r, x) for r in recons])
        real_f.append(_pooled(fd_net, x).cpu())
        fake_f.append(_pooled(fd_net, y).cpu())
        if first is None:
            first = (x[:8].cpu(), [r[:8].cpu() for r in recons])
    fd = frechet_distance(*gaussian_stats(torch.cat(real_f)), *gaussian_stats(torch.cat(fake_f)))
    k = len(band_ps[0])
    result = {
        "run": str(run), "step": int(record["step"]), "images": image_list.to_dict(),
        "n_images": len(paths), "psnr": float(torch.cat(ps).mean()),
        "ssim": float(torch.cat(ss).mean()) if ss else None,
        "frechet_distance": fd, "fd_encoder": fd_name,
        "fd_note": "Fréchet distance of globally pooled features of fd_encoder (not rFID)",
        "band_psnr": [float(torch.cat([b[j] for b in band_ps]).mean()) for j in range(k)],
        "modulator": model.modulator.kind, "weights": "ema",
    }
    if out is not None:
        from ..profile import atomic_write_text
        from .train import save_grid

        out = Path(out)
        x8, r8 = first
        save_grid(out / "bands.png", x8, *r8)  # originals, then band 0, bands 0..1, ...
        atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
        result["written"] = [str(out / "eval.json"), str(out / "bands.png")]
    return result


def format_results(result: Mapping[str, Any]) -> str:
    """A few readable lines of :func:`evaluate_run`'s result."""
    lines = [f"{result['run']} (step {result['step']}, {result['n_images']} images, "
             f"{result['modulator']} bands, EMA weights)",
             f"  PSNR {result['psnr']:.2f} dB" + (f"   SSIM {result['ssim']:.4f}"
                                                  if result.get("ssim") is not None else ""),
             f"  Fréchet distance {result['frechet_distance']:.4f} in {result['fd_encoder']} "
             "features (pooled; not rFID)",
             "  band-wise PSNR (bands 0..k): " + ", ".join(
                 f"{v:.2f}" for v in result["band_psnr"])]
    for path in result.get("written", []):
        lines.append(f"  wrote {path}")
    return "\n".join(lines)
