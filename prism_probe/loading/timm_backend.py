"""The timm backend: any ``timm.create_model`` architecture, ViTs above all.

Weights
-------
``entry.id`` is the timm model name (with its pretrained tag, e.g.
``vit_base_patch14_dinov2.lvd142m``); ``entry.options`` are keyword arguments for
``timm.create_model`` (``img_size``, ``dynamic_img_size``, ``depth``…). A local file goes through
``pretrained_cfg_overlay=dict(file=PATH)`` so that timm's key-conversion filter runs on it (a
plain ``checkpoint_path=`` would not convert keys); hub weights come from timm's own source (the
Hugging Face cache), ``random:NAME`` is ``pretrained=False`` and downloads nothing.

Features
--------
``features.layer: final`` is ``forward_features`` (the last block after the model's final norm)
with ``model.num_prefix_tokens`` tokens (CLS, registers) dropped, reshaped row-major onto the
patch grid ``patch_embed.dynamic_feat_size((H, W))``; the layer label is ``blocks.{L-1}+norm``
(``blocks.{L-1}`` when the model's final norm is an identity, as in average-pooled ViTs that
normalise after pooling). An integer ``i`` is block ``i``'s output (0-based, negative counts from
the end) from ``forward_intermediates``, without the final norm, labelled ``blocks.{i}``.
Models whose ``forward_features`` is already (B, C, h, w) (CNNs) are used as they are.

Splitting (feature ablation)
----------------------------
For timm ``VisionTransformer`` models, ``encoder.split("blocks.K")`` (0 <= K <= depth) returns
``(head, tail)``:

- ``head(pixels)`` runs patch embedding, position embedding, ``norm_pre`` and blocks ``0..K-1``
  and returns the token sequence in its native layout (B, P + h·w, C): the first
  ``P = head.prefix_tokens`` tokens are the prefix (CLS, then registers), the remaining h·w are
  the patch tokens in row-major order over the grid ``head.grid_for((H, W))``. ``blocks.0`` is
  the embedded input before any block.
- ``tail(tokens)`` runs blocks ``K..``, the final norm and the model's own pooling
  (``forward_head(..., pre_logits=True)``: CLS token, average or attention pool, plus
  ``fc_norm``) and returns pooled features (B, D), so ``tail(head(x))`` equals
  ``model.forward_head(model.forward_features(x), pre_logits=True)``.

An ablation filters ``tokens[:, P:]`` (reshaped to the grid) and leaves the prefix as it is.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from .. import weights as W
from ..errors import PrismError, WeightsError
from ..registry import EncoderEntry
from . import make_preprocess
from .base import Encoder, FeatureMap, model_dtype, place, tokens_to_grid


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _native_size(name: str) -> tuple[int, int] | None:
    cfg = timm.models.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return (int(size[1]), int(size[2])) if size else None


def _create(entry: EncoderEntry, weights: W.ResolvedWeights, kwargs: dict[str, Any], dirs):
    """``timm.create_model`` from the resolved weights, with library errors made one line."""
    if "img_size" in kwargs and "img_size" not in entry.options:
        try:
            return _create_once(entry, weights, kwargs, dirs)
        except TypeError as exc:  # CNNs take any input size and no img_size argument
            if "img_size" not in str(exc):
                raise
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    return _create_once(entry, weights, kwargs, dirs)


def _create_once(entry, weights, kwargs, dirs):
    if weights.random or weights.source == "none":
        return timm.create_model(entry.id, pretrained=False, **kwargs)
    if weights.path is not None:
        try:
            return timm.create_model(entry.id, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(weights.path)),
                                     **kwargs)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise WeightsError(f"{weights.path}: does not fit timm model '{entry.id}' "
                               f"({first[:200]})") from None
    hub = weights.hub
    if hub:
        W.require_hub_cache(entry, hub, dirs)
        kwargs = {**kwargs, "pretrained_cfg_overlay": dict(hf_hub_id=hub.removeprefix("hf-hub:"))}
    try:
        return timm.create_model(entry.id, pretrained=True, **kwargs)
    except OSError as exc:  # hub/cache misses (including offline mode) are OSErrors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise W.missing(entry, dirs, f"timm could not fetch it: {first[:160]}") from None


def _final_label(model: nn.Module) -> str:
    depth = len(getattr(model, "blocks", ()))
    last = f"blocks.{depth - 1}" if depth else "forward_features"
    norm = getattr(model, "norm", None)
    return last if norm is None or isinstance(norm, nn.Identity) else last + "+norm"


def vit_feature_fn(model: nn.Module, layer: Any, *, dtype: torch.dtype = torch.float32):
    """A function pixels -> :class:`FeatureMap` for a timm model and a ``features.layer``.

    Shared with the open_clip backend, whose SigLIP towers are timm models.
    """
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    patch_embed = getattr(model, "patch_embed", None)
    depth = len(getattr(model, "blocks", ()))

    if layer in (None, "final"):
        label = _final_label(model)

        def forward(pixels: torch.Tensor) -> FeatureMap:
            h_in, w_in = pixels.shape[-2:]
            out = model.forward_features(pixels.to(dtype))
            if out.ndim == 4:  # CNNs give (B, C, h, w) directly
                return FeatureMap(out.float(), "forward_features", h_in / out.shape[-2], 0)
            grid = patch_embed.dynamic_feat_size((h_in, w_in))
            fmap = tokens_to_grid(out, grid, prefix).float()
            return FeatureMap(fmap, label, h_in / grid[0], prefix)

        return forward

    if isinstance(layer, bool) or not isinstance(layer, int):
        raise PrismError(f"features.layer {layer!r}: use 'final' or a block index (int)")
    if depth and not -depth <= layer < depth:
        raise PrismError(f"features.layer {layer}: this model has blocks 0..{depth - 1}")
    index = layer % depth if depth else layer

    def forward(pixels: torch.Tensor) -> FeatureMap:
        h_in = pixels.shape[-2]
        (out,) = model.forward_intermediates(pixels.to(dtype), indices=[index],
                                             output_fmt="NCHW", intermediates_only=True)
        return FeatureMap(out.float(), f"blocks.{index}", h_in / out.shape[-2], prefix)

    return forward


def vit_split(model: nn.Module, label: str = "model"):
    """``split(at)`` for a timm VisionTransformer (see the module docstring)."""
    from timm.models.vision_transformer import VisionTransformer

    def split(at: str):
        if not isinstance(model, VisionTransformer):
            raise PrismError(f"encoder '{label}': split is implemented for timm "
                             f"VisionTransformer models, not {type(model).__name__}")
        depth = len(model.blocks)
        name, _, num = str(at).partition(".")
        if name != "blocks" or not num.isdigit() or not 0 <= int(num) <= depth:
            raise PrismError(f"split point {at!r}: use 'blocks.K' with 0 <= K <= {depth} "
                             "(the tokens entering block K)")
        k = int(num)

        def head(pixels: torch.Tensor) -> torch.Tensor:
            x = model.patch_embed(pixels)
            x = model._pos_embed(x)
            x = model.patch_drop(x)
            x = model.norm_pre(x)
            for blk in model.blocks[:k]:
                x = blk(x)
            return x

        def tail(tokens: torch.Tensor) -> torch.Tensor:
            x = tokens
            for blk in model.blocks[k:]:
                x = blk(x)
            return model.forward_head(model.norm(x), pre_logits=True)

        head.prefix_tokens = int(model.num_prefix_tokens)
        head.grid_for = model.patch_embed.dynamic_feat_size
        return head, tail

    return split


def build(entry: EncoderEntry, *, weights: W.ResolvedWeights, device, image_size, dirs) -> Encoder:
    """Build a timm encoder (see the module docstring for weights, features and split)."""
    size = _hw(image_size or entry.input_size)
    kwargs = {k: v for k, v in entry.options.items() if k != "dtype"}
    native = _native_size(entry.id)
    if not kwargs.get("dynamic_img_size") and ("img_size" in kwargs or size != native):
        # A fixed-size ViT is built for the size it is fed (DINOv2 at 224 instead of timm's 518):
        # timm resamples pretrained position embeddings to the new grid.
        kwargs["img_size"] = size[0] if size[0] == size[1] else size
    dtype = model_dtype(entry)
    model = place(_create(entry, weights, kwargs, dirs), device, dtype)

    cfg = timm.data.resolve_data_config({}, model=model)
    from ..data import Preprocess

    own = Preprocess.from_timm_config(cfg, size=size).to_dict()
    own.pop("size")
    preprocess = make_preprocess(entry, size, own)

    forward = vit_feature_fn(model, entry.features.get("layer", "final"), dtype=dtype)
    return Encoder(entry, model, preprocess, forward, weights=weights.info(),
                   split=vit_split(model, entry.name), library={"timm": timm.__version__})
