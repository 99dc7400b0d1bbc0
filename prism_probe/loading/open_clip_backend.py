"""The open_clip backend: CLIP-style image towers, native or timm (SigLIP).

Weights
-------
``entry.id`` is an open_clip architecture name (``ViT-B-16-quickgelu``, ``ViT-B-16-SigLIP2``);
``weights.tag`` is its pretrained tag (``openai``, ``webli``), fetched by open_clip into the
Hugging Face cache; ``weights.hub`` names that cache repository so presence can be checked
without the network. A local file is handed to ``create_model_and_transforms(pretrained=FILE)``.
``random:NAME`` builds the architecture with ``pretrained=None``; its text tower, which this
toolkit never runs, is then built tiny so that a random build takes seconds. Only the image
tower (``model.visual``) is kept.

The QuickGELU trap: OpenAI's weights were trained with QuickGELU, and open_clip only warns when
they are loaded into a GELU architecture (the features are then wrong). An entry whose tag's
activation differs from its architecture's is refused before anything is loaded.

Features
--------
Native towers (``open_clip.transformer.VisionTransformer``): ``features.layer: final`` is the
last residual block's patch tokens after ``ln_post``, the CLS token dropped, labelled
``resblocks.{L-1}+ln_post``; these are unprojected (width, not embed_dim) and they are what
``output_tokens=True`` returns for the usual token-pooled towers. An integer is that block's
output without ``ln_post`` (``resblocks.{i}``). Both come from ``visual.forward_intermediates``.
The native tower accepts only its own image size; a different requested size rebuilds it for that
size (``force_image_size``; pretrained position embeddings are resampled by open_clip).
timm towers (SigLIP): ``model.visual.trunk`` is a timm model and is read exactly as the timm
backend reads it (no prefix tokens for SigLIP; final norm applied).
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
from open_clip.transformer import VisionTransformer

from .. import weights as W
from ..errors import PrismError, RegistryError, WeightsError
from ..registry import EncoderEntry
from . import make_preprocess
from .base import Encoder, FeatureMap, model_dtype, place
from .timm_backend import vit_feature_fn, vit_split

_RESIZE = {"shortest": "shorter", "squash": "squash"}


def check_quick_gelu(entry: EncoderEntry) -> None:
    """Refuse an entry whose pretrained tag needs a different activation than its architecture.

    Raises
    ------
    RegistryError
        For example ``ViT-B-16`` with the ``openai`` tag (trained with QuickGELU): the fix is
        ``ViT-B-16-quickgelu``.
    """
    tag = entry.weights.get("tag")
    if not tag:
        return
    tag_cfg = open_clip.get_pretrained_cfg(entry.id, tag)
    model_cfg = open_clip.get_model_config(entry.id) or {}
    if not tag_cfg:
        return  # an unknown tag is reported when weights are fetched
    want = bool(tag_cfg.get("quick_gelu", False))
    have = bool(model_cfg.get("quick_gelu", False) or entry.options.get("force_quick_gelu"))
    if want != have:
        act = "QuickGELU" if want else "GELU"
        fix = f"'{entry.id}-quickgelu'" if want else f"'{entry.id.removesuffix('-quickgelu')}'"
        raise RegistryError(
            f"entry '{entry.name}': open_clip weights '{tag}' were trained with {act} but "
            f"architecture '{entry.id}' uses {'GELU' if want else 'QuickGELU'}; the features "
            f"would be wrong. Use id {fix}")


def _tag_repo(entry: EncoderEntry) -> str | None:
    """The hub repository open_clip fetches the entry's tag from, if any."""
    hub = entry.weights.get("hub")
    if hub:
        return hub
    cfg = open_clip.get_pretrained_cfg(entry.id, entry.weights.get("tag", ""))
    return (cfg.get("hf_hub") or "").strip("/") or None


def _tiny_text(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A minimal text tower config, for random builds that only keep the image tower."""
    text = model_cfg.get("text_cfg", {})
    return {"context_length": text.get("context_length", 77), "vocab_size": 8, "width": 8,
            "heads": 1, "layers": 1}


def _create(entry: EncoderEntry, weights: W.ResolvedWeights, kwargs: dict[str, Any], dirs):
    if weights.random or weights.source == "none":
        cfg = open_clip.get_model_config(entry.id)
        if cfg is None:
            raise RegistryError(f"entry '{entry.name}': open_clip has no architecture "
                                f"'{entry.id}' (open_clip.list_models() lists them)")
        kwargs = {"text_cfg": _tiny_text(cfg), **kwargs}
        return open_clip.create_model_and_transforms(entry.id, pretrained=None, **kwargs)[0]
    if weights.path is not None:
        source = str(weights.path)
    else:
        tag = entry.weights.get("tag")
        if not tag or not open_clip.get_pretrained_cfg(entry.id, tag):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(entry.id)) or "none"
            raise RegistryError(f"entry '{entry.name}': '{tag}' is not an open_clip tag of "
                                f"'{entry.id}' (known: {tags})")
        repo = _tag_repo(entry)
        if repo:
            W.require_hub_cache(entry, repo, dirs)
        source = tag
    try:
        return open_clip.create_model_and_transforms(entry.id, pretrained=source, **kwargs)[0]
    except (RuntimeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if weights.path is not None:
            raise WeightsError(f"{weights.path}: open_clip could not load it into "
                               f"'{entry.id}' ({first})") from None
        raise W.missing(entry, dirs, f"open_clip could not fetch it: {first}") from None


def _native_feature_fn(visual: VisionTransformer, layer: Any, dtype: torch.dtype):
    depth = len(visual.transformer.resblocks)
    if layer in (None, "final"):
        index, norm, label = depth - 1, True, f"resblocks.{depth - 1}+ln_post"
    elif isinstance(layer, int) and not isinstance(layer, bool) and -depth <= layer < depth:
        index, norm = layer % depth, False
        label = f"resblocks.{index}"
    else:
        raise PrismError(f"features.layer {layer!r}: use 'final' or a block index in "
                         f"0..{depth - 1}")

    def forward(pixels: torch.Tensor) -> FeatureMap:
        out = visual.forward_intermediates(pixels.to(dtype), indices=[index],
                                           normalize_intermediates=norm,
                                           intermediates_only=True, output_fmt="NCHW")
        fmap = out["image_intermediates"][0].float()
        return FeatureMap(fmap, label, pixels.shape[-2] / fmap.shape[-2], 1)

    return forward


def _preprocess(entry: EncoderEntry, visual, size: tuple[int, int]):
    """Preprocessing from the tower's config and the tag's (the tag carries SigLIP's 0.5/0.5)."""
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    tag = entry.weights.get("tag")
    if tag:
        tag_cfg = open_clip.get_pretrained_cfg(entry.id, tag)
        cfg.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                    if tag_cfg.get(k) is not None})
    defaults = {"mean": cfg.get("mean"), "std": cfg.get("std"),
                "interpolation": cfg.get("interpolation"),
                "resize": _RESIZE.get(cfg.get("resize_mode") or "shortest", "shorter"),
                "crop_pct": 1.0}
    if defaults["interpolation"] not in ("bicubic", "bilinear"):
        defaults["interpolation"] = None
    return make_preprocess(entry, size, defaults)


def build(entry: EncoderEntry, *, weights: W.ResolvedWeights, device, image_size, dirs) -> Encoder:
    """Build an open_clip image tower (see the module docstring)."""
    check_quick_gelu(entry)
    size = tuple(image_size or entry.input_size)
    kwargs = {k: v for k, v in entry.options.items() if k != "dtype"}
    cfg = open_clip.get_model_config(entry.id) or {}
    native_size = cfg.get("vision_cfg", {}).get("image_size")
    if native_size is not None and "force_image_size" not in kwargs:
        native = (native_size,) * 2 if isinstance(native_size, int) else tuple(native_size)
        if native != size:
            kwargs["force_image_size"] = size
    dtype = model_dtype(entry)
    model = _create(entry, weights, kwargs, dirs)
    visual = place(model.visual, device, dtype)
    del model  # the text tower is never used

    layer = entry.features.get("layer", "final")
    if isinstance(visual, VisionTransformer):
        forward = _native_feature_fn(visual, layer, dtype)
        split = None
    elif hasattr(visual, "trunk"):
        forward = vit_feature_fn(visual.trunk, layer, dtype=dtype)
        split = vit_split(visual.trunk, entry.name)
    else:
        raise PrismError(f"entry '{entry.name}': open_clip tower {type(visual).__name__} has "
                         "no patch-token grid (ResNet towers are not supported)")
    return Encoder(entry, visual, _preprocess(entry, visual, size), forward,
                   weights=weights.info(), split=split,
                   library={"open_clip": open_clip.__version__})
