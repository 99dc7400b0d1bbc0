"""The ``pixels`` backend: the image itself as a feature map, the reference for every spectrum.

``pixels:P`` rearranges the preprocessed image (3, H, W) into a grid of P×P patches: a map of
3·P² channels on an (H/P) × (W/P) grid, stride P px per cell. ``pixels:1`` is the image itself.

Channel order is that of :func:`torch.nn.functional.pixel_unshuffle`: channel
``c·P² + i·P + j`` of cell (u, v) is colour ``c`` of pixel ``(u·P + i, v·P + j)``, i.e. colour
major, then row within the patch, then column. ``Encoder.decode`` inverts it exactly
(``pixel_shuffle``) and, when the entry's values are in [0, 1], gives the image back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrismError
from ..registry import EncoderEntry
from ..weights import ResolvedWeights
from . import make_preprocess
from .base import Encoder, FeatureMap


class SpaceToDepth(nn.Module):
    """(B, 3, H, W) → (B, 3·P², H/P, W/P) by ``pixel_unshuffle``; no weights.

    It holds an empty non-persistent buffer only so that ``Encoder.device`` knows where batches
    should go.
    """

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.patch)

    def inverse(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(fmap, self.patch)


def build(entry: EncoderEntry, *, weights: ResolvedWeights, device, image_size=None,
          dirs=()) -> Encoder:
    """Build ``pixels:P`` (P = ``entry.options["patch"]``); the input size must divide by P."""
    patch = entry.options.get("patch", 16)
    if not isinstance(patch, int) or patch < 1:
        raise PrismError(f"entry '{entry.name}': options.patch must be a positive integer, "
                         f"got {patch!r}")
    preprocess = make_preprocess(entry, image_size)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    h, w = image_size if image_size is not None else entry.input_size
    if h % patch or w % patch:
        raise PrismError(f"'{entry.name}': input {h}×{w} px is not a multiple of the patch "
                         f"size {patch}; choose an --image-size divisible by {patch}")
    model = SpaceToDepth(patch).to(device).eval()

    def forward(pixels: torch.Tensor) -> FeatureMap:
        return FeatureMap(model(pixels), layer=f"pixels:{patch}", stride=float(patch))

    value_range = entry.input.get("value_range")
    in_unit_range = value_range is not None and tuple(value_range) == (0, 1)
    return Encoder(entry, model, preprocess, forward, weights=weights.info(),
                   decode=model.inverse if in_unit_range else None,
                   library={"torch": torch.__version__})
