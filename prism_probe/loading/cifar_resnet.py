"""The ``cifar_resnet`` backend: ResNet-20/32/44/56/110 for CIFAR-10 with option-A shortcuts.

Architecture: conv 3→16 + BN + ReLU (``conv1``), three stages of ``n`` basic blocks with 16, 32
and 64 channels (``layer1``, ``layer2``, ``layer3``; depth = 6n + 2), global average pool and
``linear`` 64→10. A stage that halves the grid shortcuts with stride-2 subsampling and zero
channel padding (option A), so shortcuts carry no weights. At 32 px the stage grids are 32, 16
and 8 cells (stride 1, 2 and 4 px per cell).

The weights are legacy pickles ``{"best_prec1": …, "state_dict": {"module.conv1.weight": …}}``
saved from ``nn.DataParallel`` on CUDA; they are read on the CPU with ``weights_only=True`` and
the ``module.`` prefix is stripped.

Split and head semantics, for probes that continue the forward pass from an edited map:

- ``encoder.split(at)`` for ``at`` in ``conv1``, ``layer1``, ``layer2``, ``layer3`` returns
  ``(head, tail)``: ``head(pixels)`` is the (B, C, h, w) output of stage ``at``; ``tail(map)``
  runs the remaining stages and returns the **pooled 64-d features** (B, 64).
- ``encoder.head(x)`` is the model's own classifier and returns **logits** (B, 10). It takes
  either the layer3 map (B, 64, h, w), which it average-pools first, or already pooled features
  (B, 64), as ``tail`` returns them. So ``encoder.head(tail(edited_map))`` are the model's logits
  for a map edited at ``at``, and ``encoder.head(encoder.encode(x).tensor)`` its logits for x
  when the feature layer is ``layer3``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrismError, WeightsError
from ..registry import EncoderEntry
from ..weights import ResolvedWeights, load_state_dict
from . import make_preprocess
from .base import Encoder, FeatureMap

STAGES = ("conv1", "layer1", "layer2", "layer3")
WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU; option-A shortcut when the shape changes."""

    def __init__(self, n_in: int, n_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.stride = stride
        self.pad = n_out - n_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        # Option A: subsample, then zero channels split evenly on both sides (no weights).
        x = x[:, :, ::self.stride, ::self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth ``6n + 2``; keys match the published checkpoints (sans
    ``module.``). ``forward`` returns logits (B, num_classes) for (B, 3, H, W) normalised input.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise PrismError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), "
                             f"got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        n_in = WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            blocks = [BasicBlock(n_in if j == 0 else width, width, 2 if (i and j == 0) else 1)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            n_in = width
        self.linear = nn.Linear(WIDTHS[-1], num_classes)

    def stage(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function computing stage ``name`` (one of STAGES) from the previous one."""
        if name == "conv1":
            return lambda x: F.relu(self.bn1(self.conv1(x)))
        return getattr(self, name)

    def run(self, x: torch.Tensor, start: str | None, stop: str) -> torch.Tensor:
        """Stages after ``start`` (None: from the pixels) up to and including ``stop``."""
        first = 0 if start is None else STAGES.index(start) + 1
        for name in STAGES[first:STAGES.index(stop) + 1]:
            x = self.stage(name)(x)
        return x

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Global average pool of the layer3 map: (B, 64, h, w) → (B, 64)."""
        return fmap.mean(dim=(-2, -1))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) from the layer3 map (B, 64, h, w) or pooled features (B, 64)."""
        if x.ndim == 4:
            x = self.pool(x)
        if x.ndim != 2 or x.shape[1] != self.linear.in_features:
            raise PrismError(f"the classifier head takes (B, {self.linear.in_features}, h, w) "
                             f"layer3 maps or (B, {self.linear.in_features}) pooled features, "
                             f"got {tuple(x.shape)}")
        return self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.run(x, None, "layer3"))


def depth_of(entry: EncoderEntry) -> int:
    """The depth in the entry's id (``resnet20`` → 20)."""
    ident = str(entry.id)
    digits = ident[len("resnet"):] if ident.startswith("resnet") else ""
    if not digits.isdigit():
        raise PrismError(f"entry '{entry.name}': cifar_resnet id must be 'resnet<depth>' such as "
                         f"resnet20 or resnet56, got {ident!r}")
    return int(digits)


def load_checkpoint(model: nn.Module, path) -> dict:
    """Load a legacy checkpoint into ``model`` strictly; return its extra fields (best_prec1)."""
    raw = load_state_dict(path, what="CIFAR ResNet weights")
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict (or {{'state_dict': …}}), "
                           f"got {type(sd).__name__}")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    # The checkpoints predate BatchNorm's num_batches_tracked counter, which eval never reads.
    for key in own:
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = own[key]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong-shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label} keys {', '.join(keys[:4])}{more}")
        raise WeightsError(f"{path}: does not fit a ResNet-{model.depth} for CIFAR: "
                           + "; ".join(parts) + " (is it the right depth?)")
    model.load_state_dict(sd, strict=True)
    return {k: v for k, v in raw.items() if k != "state_dict"} if "state_dict" in raw else {}


def build(entry: EncoderEntry, *, weights: ResolvedWeights, device, image_size=None,
          dirs=()) -> Encoder:
    """Build a CIFAR ResNet; the feature map is the stage ``features.layer`` (default layer3).

    See the module docstring for what ``split``, ``head`` and ``tail`` return. The FeatureMap's
    stride is input pixels per grid cell (32 px / 8 cells = 4 for layer3).
    """
    layer = str(entry.features.get("layer", "layer3"))
    if layer not in STAGES:
        raise PrismError(f"entry '{entry.name}': features.layer must be one of "
                         f"{', '.join(STAGES)}, got {layer!r}")
    model = CifarResNet(depth_of(entry), int(entry.options.get("num_classes", 10)))
    extra = {}
    if not weights.random:
        if weights.path is None or weights.path.is_dir():
            raise WeightsError(f"entry '{entry.name}': the cifar_resnet backend loads one "
                               f"checkpoint file; got {weights.location!r}")
        extra = load_checkpoint(model, weights.path)
    model.to(device).eval().requires_grad_(False)

    def forward(pixels: torch.Tensor) -> FeatureMap:
        fmap = model.run(pixels, None, layer)
        meta = {"best_prec1": float(extra["best_prec1"])} if "best_prec1" in extra else {}
        return FeatureMap(fmap, layer=layer, stride=pixels.shape[-1] / fmap.shape[-1], meta=meta)

    def split(at: str):
        if at not in STAGES:
            raise PrismError(f"encoder '{entry.name}': split point must be one of "
                             f"{', '.join(STAGES)}, got {at!r}")

        def head(pixels: torch.Tensor) -> torch.Tensor:
            return model.run(pixels, None, at)

        def tail(fmap: torch.Tensor) -> torch.Tensor:
            return model.pool(model.run(fmap, at, "layer3"))

        return head, tail

    return Encoder(entry, model, make_preprocess(entry, image_size), forward,
                   weights=weights.info(), split=split, head=model.classify,
                   library={"torch": torch.__version__})
