"""The interface every backend implements: an :class:`Encoder` that turns a batch of
preprocessed images into a :class:`FeatureMap` (B, C, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import NumericsError, PrismError
from ..registry import EncoderEntry


@dataclass
class FeatureMap:
    """A spatial feature map and what it is.

    Attributes
    ----------
    tensor : Tensor (B, C, h, w)
        Features on a grid of h × w cells, channels first. Prefix tokens (CLS, registers) are
        already dropped; token order is row-major over the image (row 0 is the image's top).
    layer : str
        Which output this is, in the library's own words (``"blocks.11+norm"``, ``"latent_mean"``).
    stride : float
        Input pixels per grid cell along each axis (the patch size for a ViT), so that a frequency
        in cycles per cell divided by ``stride`` is in cycles per input pixel.
    prefix_tokens : int
        How many tokens were dropped before the grid (as reported by the model).
    """

    tensor: torch.Tensor
    layer: str
    stride: float
    prefix_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])  # type: ignore[return-value]


@dataclass
class WeightsInfo:
    """Where an encoder's weights came from, recorded in every profile."""

    source: str  # "file", "hub", "url", "random", "none"
    location: str | None = None  # path, hub id or URL
    sha256: str | None = None  # of the file that was loaded, when there is one file

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "location": self.location, "sha256": self.sha256}


class Encoder:
    """A loaded encoder.

    Backends construct it with the module (in eval mode, on its device) and a function that maps
    a preprocessed batch to a :class:`FeatureMap`. ``preprocess`` turns a PIL image into the
    (3, H, W) tensor the model expects (size, crop, value range or mean/std).
    """

    def __init__(
        self,
        entry: EncoderEntry,
        model: torch.nn.Module,
        preprocess: Any,
        forward: Callable[[torch.Tensor], FeatureMap],
        *,
        weights: WeightsInfo,
        label: str | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        split: Callable[[str], tuple[Callable, Callable]] | None = None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        library: dict[str, str] | None = None,
    ):
        self.entry = entry
        self.model = model
        self.preprocess = preprocess
        self._forward = forward
        self._decode = decode
        self._split = split
        self._head = head
        self.weights = weights
        self.label = label or entry.name
        self.library = library or {}

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def has_decoder(self) -> bool:
        return self._decode is not None

    @property
    def has_head(self) -> bool:
        return self._head is not None

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> FeatureMap:
        """Features of a preprocessed batch (B, 3, H, W) as a (B, C, h, w) map (not checked)."""
        return self._forward(pixels.to(self.device))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W), from a latent map; only for autoencoders."""
        if self._decode is None:
            raise PrismError(f"encoder '{self.label}' has no decoder: latent ablation needs an "
                             "autoencoder (tae, diffusers or uae backend)")
        return self._decode(latent.to(self.device))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The model's own classifier head (logits) applied to the last feature map or, where the
        backend allows it (cifar_resnet), to the pooled features that ``split``'s tail returns."""
        if self._head is None:
            raise PrismError(f"encoder '{self.label}' has no classifier head of its own; use "
                             "--train/--test folders for kNN or a linear probe")
        return self._head(features)

    def split(self, at: str) -> tuple[Callable, Callable]:
        """``(head, tail)`` so that ``tail(head(x))`` is the full forward pass, cut at ``at``.

        ``head(pixels)`` returns the intermediate tensor in its native layout; ``tail`` continues
        the model's own forward pass from it and returns the final (pooled) features.
        """
        if self._split is None:
            raise PrismError(f"encoder '{self.label}' declares no split points; feature "
                             "ablation needs a timm ViT, a CIFAR ResNet or a 'split' entry")
        return self._split(at)

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "entry": self.entry.to_dict(),
            "weights": self.weights.to_dict(),
            "preprocess": self.preprocess.to_dict() if hasattr(self.preprocess, "to_dict")
            else repr(self.preprocess),
            "library": dict(self.library),
        }


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_dtype(entry: EncoderEntry, default: str = "float32") -> torch.dtype:
    """The torch dtype named by ``options.dtype`` (float32, float16 or bfloat16)."""
    name = str(entry.options.get("dtype", default))
    if name not in _DTYPES:
        raise PrismError(f"entry '{entry.name}': options.dtype {name!r} is not one of "
                         f"{', '.join(_DTYPES)}")
    return _DTYPES[name]


def place(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """The model in eval mode on ``device``, cast only when a dtype other than float32 is asked."""
    model = model.eval().to(device)
    return model if dtype == torch.float32 else model.to(dtype)


def check_finite(fmap: FeatureMap, *, encoder: str, batch: int) -> None:
    """Refuse non-finite features, naming the encoder and batch (fp16 SDXL VAE is the known case)."""
    t = fmap.tensor
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NumericsError(
            f"encoder '{encoder}' gave {bad} non-finite feature values in batch {batch} "
            f"(layer {fmap.layer}); run it in float32 or bfloat16 (--dtype) instead of float16")


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """(B, prefix + h·w, C) tokens, row-major, to a (B, C, h, w) map with the prefix dropped."""
    b, n, c = tokens.shape
    h, w = grid
    if n - prefix != h * w:
        raise PrismError(f"token count {n} minus {prefix} prefix tokens does not fill a "
                         f"{h}×{w} grid; the input size must be a multiple of the patch size")
    return tokens[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
