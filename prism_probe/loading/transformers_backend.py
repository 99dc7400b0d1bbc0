"""The transformers backend: ViT-family image models from the Hugging Face hub.

Weights
-------
``weights.hub`` (or ``entry.id``) is a hub repository read with ``from_pretrained`` through the
Hugging Face cache, with ``local_files_only`` when offline; a folder ``<name>/`` saved by
``save_pretrained`` in a weights directory is read the same way; a single weights file is loaded
into the architecture built from ``options.config``. ``trust_remote_code`` is the entry's (off by
default). CLIP and SigLIP repositories hold both towers; only the image tower is built.
``random:NAME`` builds from ``options.config`` (a mapping with ``model_type`` and that model's
config fields) or, without one, from the defaults of the architecture named by the id
(:data:`DEFAULT_CONFIGS`); nothing is downloaded. Other ``options`` keys override config fields
(``mask_ratio: 0.0`` for MAE); ``options.dtype`` sets the dtype.

Features
--------
``features.layer: final`` is the last layer's patch tokens after the model's final norm:
``last_hidden_state`` for DINOv2, SigLIP and ViTMAE (already normed there, label
``layers.{L-1}+layernorm`` or ``+post_layernorm``), and for CLIP ``post_layernorm`` applied to
``last_hidden_state`` (which HF leaves un-normed; label ``layers.{L-1}+post_layernorm``). An
integer ``i`` is ``hidden_states[i + 1]`` (the output of layer i, no final norm, ``layers.{i}``).
Prefix tokens are counted from the model: DINOv2 1, DINOv2 with registers
``1 + config.num_register_tokens``, CLIP 1, ViTMAE 1, SigLIP 0.

ViTMAE shuffles its patch tokens by ``argsort`` of random noise even with ``mask_ratio=0``; this
backend passes ``noise = arange(L)`` (identity order), forces ``mask_ratio = 0`` and un-shuffles
by the returned ``ids_restore`` as well, so its tokens are in image order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel

from .. import weights as W
from ..errors import PrismError, WeightsError
from ..registry import EncoderEntry
from . import make_preprocess
from .base import Encoder, FeatureMap, model_dtype, place, tokens_to_grid

# Defaults for random builds of entries without options.config, matched against the id.
DEFAULT_CONFIGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dinov2-with-registers", {"model_type": "dinov2_with_registers", "patch_size": 14,
                               "image_size": 518, "num_register_tokens": 4}),
    ("dinov2", {"model_type": "dinov2", "patch_size": 14, "image_size": 518}),
    ("clip-vit-large-patch14", {"model_type": "clip_vision_model", "hidden_size": 1024,
                                "intermediate_size": 4096, "num_hidden_layers": 24,
                                "num_attention_heads": 16, "patch_size": 14,
                                "image_size": 224, "projection_dim": 768,
                                "hidden_act": "quick_gelu"}),
    ("clip-vit-base-patch16", {"model_type": "clip_vision_model", "patch_size": 16,
                               "hidden_act": "quick_gelu"}),
    ("vit-mae", {"model_type": "vit_mae", "mask_ratio": 0.0}),
    ("siglip", {"model_type": "siglip_vision_model"}),
)
# Full two-tower configs map to their image tower.
_VISION_OF = {"clip": "vision_config", "siglip": "vision_config", "siglip2": "vision_config"}
# (prefix-token rule, final-norm label, accepts interpolate_pos_encoding)
_KINDS = {
    "dinov2": ("cls", "layernorm", False),
    "dinov2_with_registers": ("cls+registers", "layernorm", False),
    "clip_vision_model": ("cls", "post_layernorm", True),
    "siglip_vision_model": ("none", "post_layernorm", True),
    "siglip2_vision_model": ("none", "post_layernorm", False),
    "vit_mae": ("cls", "layernorm", True),
    "vit": ("cls", "layernorm", True),
}
_MEAN_STD = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073),
                          (0.26862954, 0.26130258, 0.27577711)),
    "siglip_vision_model": ((0.5,) * 3, (0.5,) * 3),
    "siglip2_vision_model": ((0.5,) * 3, (0.5,) * 3),
}


def random_config(entry: EncoderEntry):
    """The config a random build uses: ``options.config`` or the default for the id."""
    spec = entry.options.get("config")
    if spec is None:
        for key, default in DEFAULT_CONFIGS:
            if key in str(entry.id).lower():
                spec = default
                break
    if not spec or "model_type" not in spec:
        raise PrismError(
            f"entry '{entry.name}': a random (or single-file) build needs options.config with a "
            f"'model_type' (e.g. {{model_type: dinov2, patch_size: 14}}); no default is known "
            f"for id '{entry.id}'")
    fields = {k: v for k, v in spec.items() if k != "model_type"}
    fields.update(_overrides(entry))
    return _vision_config(AutoConfig.for_model(spec["model_type"], **fields))


def _overrides(entry: EncoderEntry) -> dict[str, Any]:
    return {k: v for k, v in entry.options.items() if k not in ("config", "dtype")}


def _vision_config(config):
    key = _VISION_OF.get(config.model_type)
    return getattr(config, key) if key else config


def _from_pretrained(entry: EncoderEntry, source: str, dirs, subfolder: str | None):
    local = W.offline() or Path(source).is_dir()
    common = dict(local_files_only=local, trust_remote_code=entry.trust_remote_code)
    if subfolder:
        common["subfolder"] = subfolder
    try:
        config = _vision_config(AutoConfig.from_pretrained(source, **common))
        for key, value in _overrides(entry).items():
            setattr(config, key, value)
        # AutoModel picks the class from the config, so a CLIP repo gives CLIPVisionModel.
        return AutoModel.from_pretrained(source, config=config, **common)
    except OSError as exc:  # missing files, offline cache misses and network errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise W.missing(entry, dirs, f"transformers could not load it: {first}") from None


def _create(entry: EncoderEntry, weights: W.ResolvedWeights, dirs):
    if weights.random or weights.source == "none":
        return AutoModel.from_config(random_config(entry))
    if weights.path is not None and weights.path.is_dir():
        return _from_pretrained(entry, str(weights.path), dirs, None)
    if weights.path is not None:
        model = AutoModel.from_config(random_config(entry))
        state = W.load_state_dict(weights.path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise WeightsError(f"{weights.path}: does not fit '{entry.name}' ({first})") from None
        return model
    hub = weights.hub or entry.id
    W.require_hub_cache(entry, hub, dirs)
    return _from_pretrained(entry, hub, dirs, entry.weights.get("subfolder"))


def _prefix(config) -> int:
    rule = _KINDS.get(config.model_type, ("cls",))[0]
    if rule == "cls+registers":
        return 1 + int(config.num_register_tokens)
    return 0 if rule == "none" else 1


def _patch(config) -> tuple[int, int]:
    p = config.patch_size
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


def feature_fn(model, layer: Any, dtype: torch.dtype):
    """pixels -> :class:`FeatureMap` for a transformers image model (module docstring)."""
    config = model.config
    _, norm_name, interp = _KINDS.get(config.model_type, ("cls", "layernorm", False))
    prefix, (ph, pw) = _prefix(config), _patch(config)
    depth = int(config.num_hidden_layers)
    is_mae = config.model_type == "vit_mae"
    # HF CLIP leaves last_hidden_state un-normed; the others norm it inside forward.
    post_norm = getattr(model, "vision_model", model).post_layernorm \
        if config.model_type == "clip_vision_model" else None

    if layer in (None, "final"):
        index, label = None, f"layers.{depth - 1}+{norm_name}"
    elif isinstance(layer, int) and not isinstance(layer, bool) and -depth <= layer < depth:
        index = layer % depth
        label = f"layers.{index}"
    else:
        raise PrismError(f"features.layer {layer!r}: use 'final' or a layer index in "
                         f"0..{depth - 1}")

    def forward(pixels: torch.Tensor) -> FeatureMap:
        b, _, h_in, w_in = pixels.shape
        grid = (h_in // ph, w_in // pw)
        kwargs: dict[str, Any] = {"output_hidden_states": index is not None}
        size = config.image_size
        if interp and (h_in, w_in) != ((size, size) if isinstance(size, int) else tuple(size)):
            kwargs["interpolate_pos_encoding"] = True
        if is_mae:
            n = grid[0] * grid[1]
            kwargs["noise"] = torch.arange(n, device=pixels.device, dtype=torch.float32) \
                .expand(b, n)
        out = model(pixel_values=pixels.to(dtype), **kwargs)
        if index is None:
            tokens = out.last_hidden_state
            if post_norm is not None:
                tokens = post_norm(tokens)
        else:
            tokens = out.hidden_states[index + 1]
        if is_mae:
            tokens = unshuffle(tokens, out.ids_restore, prefix)
        fmap = tokens_to_grid(tokens, grid, prefix).float()
        return FeatureMap(fmap, label, h_in / grid[0], prefix)

    return forward


def unshuffle(tokens: torch.Tensor, ids_restore: torch.Tensor, prefix: int) -> torch.Tensor:
    """Put ViTMAE's kept patch tokens back in image order (needs mask_ratio 0: all kept)."""
    patches = tokens[:, prefix:]
    if patches.shape[1] != ids_restore.shape[1]:
        raise PrismError(f"ViTMAE kept {patches.shape[1]} of {ids_restore.shape[1]} patches; "
                         "set options.mask_ratio to 0.0 so that every patch is encoded")
    index = ids_restore.to(patches.device).unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.cat([tokens[:, :prefix], torch.gather(patches, 1, index)], dim=1)


def build(entry: EncoderEntry, *, weights: W.ResolvedWeights, device, image_size, dirs) -> Encoder:
    """Build a transformers image encoder (see the module docstring)."""
    size = tuple(image_size or entry.input_size)
    dtype = model_dtype(entry)
    model = _create(entry, weights, dirs)
    if model.config.model_type == "vit_mae":
        model.config.mask_ratio = 0.0  # every patch encoded; order fixed by the noise we pass
    model = place(model, device, dtype)

    mean_std = _MEAN_STD.get(model.config.model_type)
    defaults = {"mean": mean_std[0], "std": mean_std[1]} if mean_std else {}
    preprocess = make_preprocess(entry, size, defaults)
    forward = feature_fn(model, entry.features.get("layer", "final"), dtype)
    return Encoder(entry, model, preprocess, forward, weights=weights.info(),
                   library={"transformers": transformers.__version__})
