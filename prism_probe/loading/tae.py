"""The ``tae`` backend: tiny autoencoders (TAESD, TAEF1, TAEF2) from their raw ``.pth`` files.

The raw files are plain state dicts of an ``nn.Sequential``; the modules below reproduce that
layout so that the keys (``0.weight``, ``1.conv.0.weight``, ``11.pool.1.weight``, …) load with
``strict=True``. One code path loads the whole family: the latent channel count is read from the
shape of the encoder's last conv (4 for TAESD, 16 for TAEF1, 32 for TAEF2) and a block gets the
GroupNorm "pool" branch exactly when its keys carry one (TAEF2's last three encoder blocks and
first three decoder blocks).

Conventions: images in [0, 1] (not [-1, 1]), latents unbounded (the encoder ends in a plain conv),
8× down-sampling, so a 256 px input gives a (C, 32, 32) latent. ``Encoder.decode`` returns images
in [0, 1]. diffusers' ``AutoencoderTiny`` cannot stand in for TAEF2: it has no pool branch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import PrismError, WeightsError
from ..registry import EncoderEntry
from ..weights import ResolvedWeights, load_state_dict
from . import make_preprocess
from .base import Encoder, FeatureMap

log = logging.getLogger("prism_probe")

STRIDE = 8
WIDTH = 64
POOL_GROUPS = 4  # fixed by the TAEF2 training code; not recoverable from the weights' shapes
POOL_EXPANSION = 4
ENCODER_POOL_BLOCKS = (11, 12, 13)  # where TAEF2 puts the branch (used for random weights)
DECODER_POOL_BLOCKS = (3, 4, 5)
# Architecture of each known id when built with random weights (no file to infer it from).
KNOWN = {"taesd": (4, False), "taef1": (16, False), "taef2": (32, True)}


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class SoftClamp(nn.Module):
    """``3·tanh(z / 3)``: the decoder's first step, bounding latents smoothly to (-3, 3)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


class PoolBranch(nn.Sequential):
    """1×1 conv to ``expansion·n`` channels (no bias), GroupNorm, ReLU, 1×1 conv back (no bias).

    Indices 0, 1, 3 carry weights, matching the raw keys ``pool.0.weight``, ``pool.1.weight``,
    ``pool.1.bias`` and ``pool.3.weight``.
    """

    def __init__(self, n: int, hidden: int, groups: int = POOL_GROUPS):
        super().__init__(
            nn.Conv2d(n, hidden, 1, bias=False),
            nn.GroupNorm(groups, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, n, 1, bias=False),
        )


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus an identity skip, then ReLU.

    With a pool branch, the branch's output is added to the block's input and the block then runs
    on that sum (``placement="input"``, the TAEF2 layout). ``placement="output"`` adds the branch
    to the block's output instead; it exists only so that tests can show that reconstruction
    quality tells the two apart.
    """

    def __init__(self, n: int, pool_hidden: int | None = None, *, groups: int = POOL_GROUPS,
                 placement: str = "input"):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = PoolBranch(n, pool_hidden, groups) if pool_hidden else None
        if placement not in ("input", "output"):
            raise ValueError(f"placement must be 'input' or 'output', got {placement!r}")
        self.placement = placement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None and self.placement == "input":
            x = x + self.pool(x)
        out = self.fuse(self.conv(x) + self.skip(x))
        if self.pool is not None and self.placement == "output":
            out = out + self.pool(out)
        return out


def _pool_hidden(sd: Mapping[str, torch.Tensor] | None, index: int, default: int | None):
    """The pool branch's hidden width of block ``index`` from its weights, or None without one."""
    if sd is None:
        return default
    w = sd.get(f"{index}.pool.0.weight")
    return int(w.shape[0]) if w is not None else None


def make_encoder(latent_channels: int, pool: Mapping[int, int] = (), *, width: int = WIDTH,
                 groups: int = POOL_GROUPS, placement: str = "input") -> nn.Sequential:
    """The TAE encoder: conv, Block, 3 × (stride-2 conv without bias, 3 Blocks), conv.

    Parameters
    ----------
    latent_channels : int
        Channels of the latent (4 TAESD, 16 TAEF1, 32 TAEF2).
    pool : mapping of int to int
        Sequential index of each block with a pool branch → the branch's hidden width.
    width : int
        Channels inside the network (64 for the whole family).
    groups, placement
        GroupNorm group count and branch placement of the pool branches (see :class:`Block`).

    Returns
    -------
    nn.Sequential
        Maps (B, 3, H, W) images in [0, 1] to (B, latent_channels, ⌈H/8⌉, ⌈W/8⌉) latents.
    """
    pool = dict(pool)
    layers: list[nn.Module] = [_conv(3, width)]
    kinds = ["block"] + (["down"] + ["block"] * 3) * 3
    for kind in kinds:
        i = len(layers)
        if kind == "down":
            layers.append(_conv(width, width, stride=2, bias=False))
        else:
            layers.append(Block(width, pool.get(i), groups=groups, placement=placement))
    layers.append(_conv(width, latent_channels))
    return nn.Sequential(*layers)


def make_decoder(latent_channels: int, pool: Mapping[int, int] = (), *, width: int = WIDTH,
                 groups: int = POOL_GROUPS, placement: str = "input") -> nn.Sequential:
    """The TAE decoder: soft clamp, conv, ReLU, 3 × (3 Blocks, 2× nearest upsample, conv without
    bias), Block, conv to RGB. Arguments as for :func:`make_encoder`; maps (B, C, h, w) latents to
    (B, 3, 8h, 8w) images in about [0, 1] (not clamped here)."""
    pool = dict(pool)
    layers: list[nn.Module] = [SoftClamp(), _conv(latent_channels, width), nn.ReLU()]
    for _ in range(3):
        for _ in range(3):
            layers.append(Block(width, pool.get(len(layers)), groups=groups, placement=placement))
        layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers.append(_conv(width, width, bias=False))
    layers.append(Block(width, pool.get(len(layers)), groups=groups, placement=placement))
    layers.append(_conv(width, 3))
    return nn.Sequential(*layers)


def _layout(sd: Mapping[str, torch.Tensor], path: Path | str, first: str, channel_axis: int):
    """(latent channels, {block index: pool width}) read from a raw state dict's shapes/keys."""
    if first not in sd or not hasattr(sd[first], "shape"):
        raise WeightsError(f"{path}: not a tiny-autoencoder state dict (no key '{first}'; first "
                           f"keys: {', '.join(list(sd)[:4])})")
    pool = {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if rest == "pool.0.weight" and head.isdigit():
            pool[int(head)] = int(value.shape[0])
    return int(sd[first].shape[channel_axis]), pool


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], path: Path | str,
                what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line WeightsError naming bad keys or shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {', '.join(missing[:4])}"
                        + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"unexpected keys {', '.join(unexpected[:4])}"
                        + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else ""))
    if shapes:
        problems.append(f"wrong shapes {', '.join(shapes[:3])}")
    if problems:
        raise WeightsError(f"{path}: the {what} weights do not fit the architecture: "
                           + "; ".join(problems))
    module.load_state_dict(sd, strict=True)


def encoder_from_state_dict(sd: Mapping[str, torch.Tensor], path: Path | str = "<state dict>",
                            **arch) -> nn.Sequential:
    """An encoder whose layout is inferred from ``sd`` and loaded from it (strict, float32).

    ``arch`` (``groups``, ``placement``) is passed to :func:`make_encoder`; the defaults are the
    real architecture. Raises WeightsError naming missing or unexpected keys.
    """
    last = max((int(k.split(".")[0]) for k in sd if k.split(".")[0].isdigit()), default=0)
    channels, _ = _layout(sd, path, f"{last}.weight", 0)
    _, pool = _layout(sd, path, "0.weight", 0)
    model = make_encoder(channels, pool, **arch)
    load_strict(model, sd, path, "encoder")
    return model


def decoder_from_state_dict(sd: Mapping[str, torch.Tensor], path: Path | str = "<state dict>",
                            **arch) -> nn.Sequential:
    """The decoder counterpart of :func:`encoder_from_state_dict` (latent channels from the
    input width of its first conv, ``1.weight``)."""
    channels, pool = _layout(sd, path, "1.weight", 1)
    model = make_decoder(channels, pool, **arch)
    load_strict(model, sd, path, "decoder")
    return model


def _random(entry: EncoderEntry) -> tuple[nn.Sequential, nn.Sequential]:
    default = KNOWN.get(str(entry.id), (None, False))
    channels = int(entry.options.get("latent_channels", default[0] or 0))
    if channels <= 0:
        raise PrismError(f"entry '{entry.name}': random weights for tae id '{entry.id}' need "
                         "options.latent_channels (known ids: " + ", ".join(KNOWN) + ")")
    has_pool = bool(entry.options.get("pool", default[1]))
    hidden = POOL_EXPANSION * WIDTH
    enc_pool = {i: hidden for i in ENCODER_POOL_BLOCKS} if has_pool else {}
    dec_pool = {i: hidden for i in DECODER_POOL_BLOCKS} if has_pool else {}
    return make_encoder(channels, enc_pool), make_decoder(channels, dec_pool)


def build(entry: EncoderEntry, *, weights: ResolvedWeights, device, image_size=None,
          dirs=()) -> Encoder:
    """Build a tiny autoencoder from its raw files (or with random weights).

    The encoder's :meth:`~prism_probe.loading.base.Encoder.encode` gives the latent as a
    FeatureMap (layer ``"latent"``, stride 8). When the entry's ``decoder:`` file was found (or
    the weights are random), :meth:`~prism_probe.loading.base.Encoder.decode` maps a
    (B, C, h, w) latent to (B, 3, 8h, 8w) images clamped to [0, 1]; its parameters are frozen
    but it is not run under ``no_grad``, so gradients reach a latent that requires them.
    """
    if weights.random:
        encoder, decoder = _random(entry)
    else:
        if weights.path is None or weights.path.is_dir():
            raise WeightsError(f"entry '{entry.name}': the tae backend loads raw .pth/.safetensors "
                               f"files; got {weights.location!r}")
        encoder = encoder_from_state_dict(load_state_dict(weights.path, what="TAE encoder"),
                                          weights.path)
        decoder = None
        if weights.decoder_path is not None:
            decoder = decoder_from_state_dict(
                load_state_dict(weights.decoder_path, what="TAE decoder"), weights.decoder_path)
        elif entry.decoder:
            log.info("%s: decoder file %s not found; latent ablation is unavailable",
                     entry.name, entry.decoder.get("file"))
        if decoder is not None and decoder[1].in_channels != encoder[-1].out_channels:
            raise WeightsError(
                f"{weights.decoder_path}: decoder takes {decoder[1].in_channels} latent channels "
                f"but the encoder {weights.path} gives {encoder[-1].out_channels}")

    model = nn.ModuleDict({"encoder": encoder})
    if decoder is not None:
        model["decoder"] = decoder
    model.to(device).eval().requires_grad_(False)

    def forward(pixels: torch.Tensor) -> FeatureMap:
        h, w = pixels.shape[-2:]
        if h % STRIDE or w % STRIDE:
            raise PrismError(f"encoder '{entry.name}': input {h}×{w} px is not a multiple of "
                             f"{STRIDE}; choose an --image-size divisible by {STRIDE}")
        return FeatureMap(encoder(pixels), layer="latent", stride=float(STRIDE))

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return decoder(latent).clamp(0, 1)

    info = weights.info()
    return Encoder(entry, model, make_preprocess(entry, image_size), forward, weights=info,
                   decode=decode if decoder is not None else None,
                   library={"torch": torch.__version__})
