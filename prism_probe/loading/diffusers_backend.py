"""The diffusers backend: VAE encoders of latent diffusion models (pixel encoders).

Weights
-------
``entry.id`` names the class: ``AutoencoderKL`` (SD, SDXL, FLUX VAEs) or ``AutoencoderTiny``
(TAESD, TAEF1). Weights are a folder ``<name>/`` written by ``save_pretrained`` in a weights
directory, or ``weights.hub`` (+ ``weights.subfolder``) through the Hugging Face cache, with
``local_files_only`` when offline. ``random:NAME`` builds the class from ``options.config`` (the
model's own ``config.json`` fields, kept in ``encoders.yaml``) with no download.
``options.dtype`` (float32 by default) is the compute dtype: SDXL's VAE overflows to inf/NaN in
float16, which :func:`prism_probe.loading.base.check_finite` then reports.

Features
--------
Input is in [-1, 1] (the entry's ``value_range``). ``AutoencoderKL``: the posterior mean
``encode(x).latent_dist.mean``, label ``latent_mean``; ``AutoencoderTiny``: ``encode(x).latents``,
label ``latent``. Latents are raw (neither shifted nor scaled; the config's ``scaling_factor`` and
``shift_factor`` are in ``FeatureMap.meta``). ``encoder.decode(latent)`` maps such a raw latent
back to images in [0, 1].
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch

from .. import weights as W
from ..errors import PrismError, WeightsError
from ..registry import EncoderEntry
from . import make_preprocess
from .base import Encoder, FeatureMap, model_dtype, place

CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def _class(entry: EncoderEntry):
    if entry.id not in CLASSES:
        raise PrismError(f"entry '{entry.name}': diffusers backend id must be one of "
                         f"{', '.join(CLASSES)}, got {entry.id!r}")
    return getattr(diffusers, entry.id)


def _create(entry: EncoderEntry, weights: W.ResolvedWeights, dirs):
    cls = _class(entry)
    if weights.random or weights.source == "none":
        config = entry.options.get("config")
        if not isinstance(config, dict):
            raise PrismError(f"entry '{entry.name}': random:{entry.name} needs options.config "
                             f"(the {entry.id} config.json fields) to build offline")
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    if weights.path is not None and not weights.path.is_dir():
        raise WeightsError(f"{weights.path}: the diffusers backend reads a folder written by "
                           f"save_pretrained (put it at {entry.name}/ in the weights folder)")
    source = str(weights.path) if weights.path is not None else weights.hub
    kwargs: dict[str, Any] = {"local_files_only": W.offline() or weights.path is not None}
    if weights.path is None:
        W.require_hub_cache(entry, source, dirs)
        if entry.weights.get("subfolder"):
            kwargs["subfolder"] = entry.weights["subfolder"]
        if entry.weights.get("revision"):
            kwargs["revision"] = entry.weights["revision"]
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:  # missing files, cache misses, network errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise W.missing(entry, dirs, f"diffusers could not load it: {first}") from None


def build(entry: EncoderEntry, *, weights: W.ResolvedWeights, device, image_size, dirs) -> Encoder:
    """Build a diffusers VAE encoder (see the module docstring)."""
    size = tuple(image_size or entry.input_size)
    dtype = model_dtype(entry)
    vae = place(_create(entry, weights, dirs), device, dtype)
    tiny = entry.id == "AutoencoderTiny"
    meta = {k: getattr(vae.config, k, None) for k in ("scaling_factor", "shift_factor")}

    def forward(pixels: torch.Tensor) -> FeatureMap:
        out = vae.encode(pixels.to(dtype))
        latent = out.latents if tiny else out.latent_dist.mean
        return FeatureMap(latent.float(), "latent" if tiny else "latent_mean",
                          pixels.shape[-2] / latent.shape[-2], 0, meta=dict(meta))

    def decode(latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = vae.decode(latent.to(dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)

    preprocess = make_preprocess(entry, size, {"value_range": (-1.0, 1.0)})
    return Encoder(entry, vae, preprocess, forward, weights=weights.info(), decode=decode,
                   library={"diffusers": diffusers.__version__})
