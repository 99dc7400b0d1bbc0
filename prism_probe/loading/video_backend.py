"""The transformers video backend: ``VideoMAEModel`` and its tubelet token grid.

Weights are found exactly as for the transformers image backend (hub cache, a saved folder, a
single file into the architecture of ``options.config``, or ``random:NAME`` from that config;
:mod:`prism_probe.loading.transformers_backend`), so the same offline message names what is
missing.

Input and features
------------------
The encoder takes clips ``(B, T, 3, H, W)``: ``T`` frames, each preprocessed the entry's image
way. VideoMAE embeds tubelets of ``tubelet_size`` frames × ``patch_size``² pixels with one 3-D
convolution, flattened time-major: token ``n`` is tubelet ``(n // (h w), (n // w) % h, n % w)``.
The backend reshapes the tokens to a ``(B, C, t, h, w)`` grid with ``t = T / tubelet_size``.
No ``bool_masked_pos`` is passed, so every tubelet is encoded (VideoMAE masks only through that
argument; it never shuffles). Its position embeddings are fixed for ``num_frames`` frames of
``image_size`` pixels, so clips must have exactly that shape.

``features.layer: final`` is ``last_hidden_state``: after the final layernorm for pre-training
checkpoints (``use_mean_pooling: false``, label ``layers.{L-1}+layernorm``); fine-tuned
classification checkpoints (``use_mean_pooling: true``) have no final norm on tokens (label
``layers.{L-1}``). An integer ``i`` is ``hidden_states[i + 1]`` (layer i's output, no norm).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from .. import weights as W
from ..errors import PrismError
from ..registry import EncoderEntry
from . import make_preprocess
from .base import Encoder, FeatureMap, model_dtype, place
from .transformers_backend import _create

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tokens_to_clip_grid(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, t·h·w, C) tokens, time-major then row-major, to a (B, C, t, h, w) grid."""
    b, n, c = tokens.shape
    t, h, w = grid
    if n != t * h * w:
        raise PrismError(f"{n} tokens do not fill a {t}×{h}×{w} tubelet grid")
    return tokens.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3).contiguous()


def feature_fn(model, layer: Any, dtype: torch.dtype):
    """clips (B, T, 3, H, W) -> :class:`FeatureMap` with a (B, C, t, h, w) tensor."""
    config = model.config
    depth = int(config.num_hidden_layers)
    p, tub = int(config.patch_size), int(config.tubelet_size)
    normed = getattr(model, "layernorm", None) is not None
    if layer in (None, "final"):
        index, label = None, f"layers.{depth - 1}" + ("+layernorm" if normed else "")
    elif isinstance(layer, int) and not isinstance(layer, bool) and -depth <= layer < depth:
        index = layer % depth
        label = f"layers.{index}"
    else:
        raise PrismError(f"features.layer {layer!r}: use 'final' or a layer index in "
                         f"0..{depth - 1}")

    def forward(clips: torch.Tensor) -> FeatureMap:
        if clips.ndim != 5:
            raise PrismError(f"a video encoder takes clips (B, T, 3, H, W), got "
                             f"{tuple(clips.shape)}")
        b, frames, _, h_in, w_in = clips.shape
        size = config.image_size
        if frames != config.num_frames or (h_in, w_in) != (size, size):
            raise PrismError(
                f"this VideoMAE takes clips of {config.num_frames} frames of {size}×{size} px "
                f"(its position embeddings are fixed); got {frames} frames of {h_in}×{w_in} "
                f"(use --frames {config.num_frames})")
        out = model(pixel_values=clips.to(dtype), output_hidden_states=index is not None)
        tokens = out.last_hidden_state if index is None else out.hidden_states[index + 1]
        grid = (frames // tub, h_in // p, w_in // p)
        fmap = tokens_to_clip_grid(tokens, grid).float()
        return FeatureMap(fmap, label, float(p), 0, meta={"temporal_stride": tub})

    return forward


def build(entry: EncoderEntry, *, weights: W.ResolvedWeights, device, image_size, dirs) -> Encoder:
    """Build a VideoMAE encoder (module docstring); ``image_size`` must equal the model's."""
    dtype = model_dtype(entry)
    model = _create(entry, weights, dirs)
    if model.config.model_type != "videomae":
        raise PrismError(f"entry '{entry.name}': the transformers_video backend supports "
                         f"VideoMAE; the config says {model.config.model_type!r}")
    size = int(model.config.image_size)
    if image_size is not None and tuple(image_size) != (size, size):
        raise PrismError(f"'{entry.name}' takes {size}×{size} px frames (fixed position "
                         f"embeddings); drop --image-size")
    model = place(model, device, dtype)
    preprocess = make_preprocess(entry, (size, size), {"mean": IMAGENET[0], "std": IMAGENET[1]})
    forward = feature_fn(model, entry.features.get("layer", "final"), dtype)
    enc = Encoder(entry, model, preprocess, forward, weights=weights.info(),
                  library={"transformers": transformers.__version__})
    enc.modality = "video"
    enc.num_frames = int(model.config.num_frames)
    enc.temporal_stride = int(model.config.tubelet_size)
    enc.blocks = list(model.encoder.layer)
    return enc
