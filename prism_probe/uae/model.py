"""The Unified Autoencoder (UAE): a semantic encoder's token grid, a frequency-band modulator and
a pixel decoder.

Data flow, for images ``x`` (B, 3, H, W) in [0, 1]::

    x ──resize to the encoder's input, normalise──▶ student encoder ──▶ latent z (B, C, h, w)
    z ──bands (FFT rings or DCT zig-zag)──▶ band-mixing ──▶ Σ bands + fusion ──▶ decoder ──▶ x̂

The student encoder starts as a copy of a registered semantic encoder (any backend whose feature
map is a token grid: timm, open_clip, transformers, CIFAR ResNets); a frozen copy of it is the
teacher for the semantic loss. Both stay in eval mode at all times, so BatchNorm statistics are
frozen and a distributed run does not depend on how a batch is split over processes.

Two band variants, chosen by ``modulator.kind`` (see ``docs``: the paper's versions v1 and v5):

``fft`` (v1)
    ``K`` ring bands of the shifted 2-D FFT taken as a residual split, edges in cycles per cell
    (``modulator.edges``); during training with masking, each sample keeps bands 0…k−1
    (``k`` uniform in 1…K) and the dropped bands are replaced by Gaussian noise of standard
    deviation σ ~ U(0, ``noise_max``).
``dct`` (v5)
    The orthonormal 2-D DCT of each channel in zig-zag order; band 0 is the first
    ``base_fraction · h·w`` coefficients (the semantic band). Frequency-masked prediction keeps
    the first ``k ~ U[k_min_fraction · N, N]`` coefficients per sample; training noise
    σ ~ U(0, ``noise_max``) · N(0, 1) is added to all tokens.

In both variants the bands then pass through two K×K band-mixing matrices (identity at init) and
the fusion block: ``Σ_k band_k + conv3×3(SiLU(conv3×3(concat bands)))``. The second conv starts
at zero, so with all bands kept and no noise the modulator is exactly the identity at init.

All band decompositions come from :mod:`prism_probe.bands` (one implementation in the project).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PrismError

__all__ = [
    "TokenGridEncoder",
    "BandModulator",
    "BandPlan",
    "ViTDecoder",
    "ConvDecoder",
    "UAE",
    "build_decoder",
    "build_uae",
    "sample_generator",
]


# ------------------------------------------------------------------------------------------------
# Per-sample random streams


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``seed`` and ``keys``.

    Every random draw that touches one training sample (crop, flip, noise, band mask) comes from
    a generator keyed by the run seed, a purpose tag, the epoch or step and the sample's global
    index in the data set. The draws are therefore the same whichever process handles the
    sample, which is what lets a two-process run reproduce a one-process run.
    """
    h = seed & 0xFFFFFFFF
    for k in keys:
        # A 64-bit multiplicative mix (splitmix-like) so that nearby keys give unrelated seeds.
        h = (h * 0x9E3779B97F4A7C15 + int(k) + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    g = torch.Generator()
    g.manual_seed(h & 0x7FFFFFFFFFFFFFFF)
    return g


# ------------------------------------------------------------------------------------------------
# Encoder


class TokenGridEncoder(nn.Module):
    """A loaded :class:`~prism_probe.loading.base.Encoder` made differentiable.

    Parameters
    ----------
    encoder : Encoder
        From :func:`prism_probe.loading.load_encoder`. Its module becomes ``self.net``; its
        preprocessing says the input size and value scaling.
    input_size : (h, w)
        Pixels the encoder is fed (224 for DINOv2-B/14 under 256 px targets: a 16×16 grid).

    ``forward(x)`` takes images (B, 3, H, W) in [0, 1] at any size, resizes them (bilinear,
    antialiased) to ``input_size``, scales them as the encoder expects and returns its feature
    map (B, C, h, w) with gradients when ``net``'s parameters require them.
    """

    def __init__(self, encoder, input_size: tuple[int, int]):
        super().__init__()
        self.net = encoder.model
        self._forward = encoder._forward  # the backend's pixels -> FeatureMap function
        self.split_fn = encoder._split  # split points, for the perceptual fallback's stages
        self.unused: set[str] = set()  # parameters that never reach the grid (build_uae)
        self.input_size = tuple(int(s) for s in input_size)
        pre = encoder.preprocess
        if getattr(pre, "value_range", None) is not None:
            lo, hi = pre.value_range
            scale, shift = torch.full((3,), hi - lo), torch.full((3,), float(lo))
        else:
            mean = torch.tensor(pre.mean or (0.0, 0.0, 0.0), dtype=torch.float32)
            std = torch.tensor(pre.std or (1.0, 1.0, 1.0), dtype=torch.float32)
            scale, shift = 1.0 / std, -mean / std
        self.register_buffer("scale", scale.view(1, 3, 1, 1).float(), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1).float(), persistent=False)

    def train(self, mode: bool = True):
        # Always eval: frozen BatchNorm statistics, no dropout (see the module docstring).
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False,
                              antialias=True)
        return self._forward(x * self.scale + self.shift).tensor


# ------------------------------------------------------------------------------------------------
# Band modulator


@dataclass
class BandPlan:
    """The training-time edits of one forward pass of the modulator, per sample.

    Attributes
    ----------
    keep : LongTensor (B,) or None
        ``fft``: number of leading bands kept (1…K); ``dct``: number of leading zig-zag DCT
        coefficients kept (1…h·w). None keeps everything.
    noise : Tensor (B, C, h, w) or None
        Gaussian noise already scaled by each sample's σ: ``fft`` puts it in place of the
        dropped bands, ``dct`` adds it to the tokens.
    """

    keep: Tensor | None = None
    noise: Tensor | None = None


class BandModulator(nn.Module):
    """Frequency-band modulator over a (B, C, h, w) latent (both variants; module docstring).

    Parameters
    ----------
    channels : int
        Latent channels C.
    grid : (h, w)
        Latent grid.
    kind : {"fft", "dct"}
    edges : list of float
        ``fft``: inner edges of the ring bands in cycles per cell (0 < e < 0.5·√2, increasing),
        K = len(edges) + 1 bands. ``dct``: fractions of the h·w zig-zag coefficients at which
        bands start (default ``[base_fraction]``: the semantic band and the rest).
    fusion_hidden : int
        Hidden channels of the fusion block (default C).
    """

    def __init__(self, channels: int, grid: tuple[int, int], *, kind: str = "dct",
                 edges: list[float] | None = None, fusion_hidden: int | None = None):
        super().__init__()
        if kind not in ("fft", "dct"):
            raise PrismError(f"modulator.kind {kind!r}: use 'fft' (paper v1, ring bands) or "
                             "'dct' (paper v5, zig-zag coefficients)")
        self.kind = kind
        self.channels = channels
        self.grid = tuple(grid)
        self.edges = [float(e) for e in (edges or ([0.25] if kind == "fft" else [0.25]))]
        if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise PrismError(f"modulator.edges {self.edges} must increase")
        self.n_bands = len(self.edges) + 1
        k = self.n_bands
        # Two band-mixing layers, identity at init: band_k ← Σ_j M[k, j] band_j.
        self.mix1 = nn.Parameter(torch.eye(k))
        self.mix2 = nn.Parameter(torch.eye(k))
        hidden = int(fusion_hidden or channels)
        self.fuse_in = nn.Conv2d(k * channels, hidden, 3, padding=1)
        self.fuse_out = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.fuse_out.weight)
        nn.init.zeros_(self.fuse_out.bias)

    # -- decomposition -----------------------------------------------------------------------

    def dct_edges(self) -> list[int]:
        """Band starts in zig-zag coefficients for the ``dct`` variant (from ``edges``)."""
        n = self.grid[0] * self.grid[1]
        return [max(1, min(n - 1, int(round(e * n)))) for e in self.edges]

    @property
    def base_coefficients(self) -> int:
        """Zig-zag coefficients in band 0 (the semantic band) for the ``dct`` variant."""
        return self.dct_edges()[0]

    def split(self, z: Tensor) -> list[Tensor]:
        """The K bands of ``z`` (B, C, h, w); they sum back to ``z`` (to float precision)."""
        from .. import bands

        if self.kind == "fft":
            return list(bands.split_bands(z, self.edges, domain="fft"))
        return list(bands.split_bands(z, self.dct_edges(), domain="zigzag"))

    def band0(self, z: Tensor) -> Tensor:
        """Band 0 (the semantic band) of ``z``, same shape."""
        return self.split(z)[0]

    # -- forward -------------------------------------------------------------------------------

    def forward(self, z: Tensor, plan: BandPlan | None = None) -> Tensor:
        """Modulated latent (B, C, h, w) from ``z`` (B, C, h, w) under the edits ``plan``."""
        from .. import bands

        if plan is not None and self.kind == "dct":
            if plan.keep is not None:
                z = bands.keep_first_dct(z, plan.keep.to(z.device))
            if plan.noise is not None:
                z = z + plan.noise.to(z)
        parts = self.split(z)
        if plan is not None and self.kind == "fft" and plan.keep is not None:
            keep = plan.keep.to(z.device).view(-1, 1, 1, 1)
            noise = plan.noise.to(z) if plan.noise is not None else torch.zeros_like(z)
            parts = [p if k == 0 else torch.where(keep > k, p, noise)
                     for k, p in enumerate(parts)]
        stacked = torch.stack(parts, dim=1)  # (B, K, C, h, w)
        stacked = torch.einsum("kj,bjchw->bkchw", self.mix1, stacked)
        stacked = torch.einsum("kj,bjchw->bkchw", self.mix2, stacked)
        b, k, c, h, w = stacked.shape
        fused = self.fuse_out(F.silu(self.fuse_in(stacked.reshape(b, k * c, h, w))))
        return stacked.sum(dim=1) + fused


# ------------------------------------------------------------------------------------------------
# Decoders


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + MLP(LN x) (GELU)."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        if width % heads:
            raise PrismError(f"decoder width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTDecoder(nn.Module):
    """MAE-style ViT pixel decoder: one token per latent cell, each decoded to a pixel patch.

    Parameters
    ----------
    channels : int
        Latent channels C.
    grid : (h, w)
        Latent grid; the output is (h·patch, w·patch) pixels.
    width, depth, heads, mlp : int
        Transformer width, blocks, attention heads, MLP hidden size (paper: 1152, 28, 16, 4096).
    patch : int
        Pixels per token along each side (paper: 16, so 16×16 tokens give 256² images).

    ``forward(z)`` maps (B, C, h, w) to images (B, 3, h·patch, w·patch), meant to be in [0, 1]
    (not clamped, so the loss sees errors beyond the range).
    """

    def __init__(self, channels: int, grid: tuple[int, int], *, width: int = 256,
                 depth: int = 4, heads: int = 4, mlp: int = 1024, patch: int = 16):
        super().__init__()
        self.grid, self.patch = tuple(grid), int(patch)
        self.embed = nn.Linear(channels, width)
        self.pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.last_layer = nn.Linear(width, 3 * patch * patch)

    def forward(self, z: Tensor) -> Tensor:
        b, c, h, w = z.shape
        x = self.embed(z.flatten(2).transpose(1, 2)) + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.last_layer(self.norm(x))  # (B, h·w, 3·p·p)
        p = self.patch
        x = x.view(b, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 3, h * p, w * p) + 0.5


class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, ch), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, ch), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class ConvDecoder(nn.Module):
    """Small convolutional pixel decoder for small runs.

    Parameters
    ----------
    channels : int
        Latent channels C.
    grid : (h, w)
        Latent grid.
    patch : int
        Upsampling factor, a power of two (output (h·patch, w·patch)).
    width : int
        Channels at the latent resolution; halved (down to 16) at each 2× upsampling.
    blocks : int
        Residual blocks per resolution.

    GroupNorm, not BatchNorm: the decoder's output must not depend on how a batch is split.
    """

    def __init__(self, channels: int, grid: tuple[int, int], *, patch: int = 4, width: int = 128,
                 blocks: int = 1):
        super().__init__()
        ups = int(round(math.log2(patch)))
        if 2 ** ups != patch:
            raise PrismError(f"conv decoder patch {patch} must be a power of two (2, 4, 8, 16)")
        self.grid, self.patch = tuple(grid), patch
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1)]
        ch = width
        for i in range(ups + 1):
            layers += [_ResBlock(ch) for _ in range(blocks)]
            if i < ups:
                out = max(16, ch // 2)
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(ch, out, 3, padding=1)]
                ch = out
        layers += [nn.GroupNorm(min(8, ch), ch), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.last_layer = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.last_layer(self.body(z)) + 0.5


def build_decoder(cfg: Mapping[str, Any], channels: int, grid: tuple[int, int],
                  image_size: tuple[int, int]) -> nn.Module:
    """The decoder named by ``cfg["kind"]`` (``vit`` or ``conv``) for a C×h×w latent.

    ``patch`` defaults to image_size / grid and must agree with it when given.
    """
    cfg = dict(cfg)
    kind = cfg.pop("kind", "vit")
    ph, pw = image_size[0] / grid[0], image_size[1] / grid[1]
    if ph != pw or ph != int(ph):
        raise PrismError(f"image size {image_size} is not a whole multiple of the latent grid "
                         f"{grid}; choose image_size = grid × patch")
    patch = int(cfg.pop("patch", int(ph)))
    if patch != int(ph):
        raise PrismError(f"decoder.patch {patch} × latent grid {grid} gives "
                         f"{grid[0] * patch} px, not image_size {image_size[0]}")
    if kind == "vit":
        return ViTDecoder(channels, grid, patch=patch, **cfg)
    if kind == "conv":
        return ConvDecoder(channels, grid, patch=patch, **cfg)
    raise PrismError(f"decoder.kind {kind!r}: use 'vit' (MAE-style) or 'conv'")


# ------------------------------------------------------------------------------------------------
# The whole model


class UAE(nn.Module):
    """Student encoder, frozen teacher, band modulator and pixel decoder.

    Attributes
    ----------
    encoder, teacher : TokenGridEncoder
        Student (trainable by stage) and its frozen copy.
    modulator : BandModulator
    decoder : ViTDecoder or ConvDecoder
    image_size : (H, W)
        Target image size in pixels.
    """

    def __init__(self, encoder: TokenGridEncoder, teacher: TokenGridEncoder | None,
                 modulator: BandModulator, decoder: nn.Module, image_size: tuple[int, int]):
        super().__init__()
        self.encoder = encoder
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
        self.modulator = modulator
        self.decoder = decoder
        self.image_size = tuple(image_size)

    def trainable_groups(self) -> dict[str, nn.Module]:
        """The parts a stage can unfreeze, by the names stage configs use."""
        return {"encoder": self.encoder, "modulator": self.modulator, "decoder": self.decoder}

    def encode(self, x: Tensor) -> Tensor:
        """Latent (B, C, h, w) of images (B, 3, H, W) in [0, 1]."""
        return self.encoder(x)

    def decode(self, z: Tensor, plan: BandPlan | None = None) -> Tensor:
        """Images (B, 3, H, W), nominally in [0, 1], from a latent through the modulator."""
        return self.decoder(self.modulator(z, plan))

    def forward(self, x: Tensor, plan: BandPlan | None = None, *, teacher: bool = False,
                clean: bool = True) -> dict[str, Tensor]:
        """One training forward pass.

        Returns
        -------
        dict
            ``latent`` (B, C, h, w) student latent; ``clean`` (B, 3, H, W) reconstruction with
            no edits (when ``clean``); ``masked`` the reconstruction under ``plan`` (when a
            plan is given); ``teacher`` the teacher's latent (when ``teacher``, no gradient).
        """
        z = self.encoder(x)
        out = {"latent": z}
        if clean:
            out["clean"] = self.decode(z)
        if plan is not None:
            out["masked"] = self.decode(z, plan)
        if teacher:
            if self.teacher is None:
                raise PrismError("this UAE was built without its teacher (inference only)")
            with torch.no_grad():
                out["teacher"] = self.teacher(x)
        return out

    def make_plan(self, z_shape: tuple[int, ...], indices: Tensor, step: int, seed: int, *,
                  mask_prob: float, noise_max: float, k_min_fraction: float) -> BandPlan:
        """Per-sample band edits, drawn from generators keyed by (seed, step, sample index).

        Parameters
        ----------
        z_shape : (B, C, h, w)
        indices : LongTensor (B,)
            Global data-set indices of the samples.
        step : int
            Optimisation step (a new draw every step).
        mask_prob : float
            Probability that a sample's bands / coefficients are masked this step.
        noise_max : float
            σ ~ U(0, noise_max).
        k_min_fraction : float
            ``dct``: fewest coefficients kept, as a fraction of h·w.
        """
        _, c, h, w = z_shape
        n = h * w
        kmin = max(1, int(math.ceil(k_min_fraction * n)))
        keeps, noises = [], []
        for idx in indices.tolist():
            g = sample_generator(seed, 2, step, idx)
            masked = torch.rand((), generator=g).item() < mask_prob
            if self.modulator.kind == "dct":
                k = int(torch.randint(kmin, n + 1, (), generator=g)) if masked else n
            else:
                nb = self.modulator.n_bands
                k = int(torch.randint(1, nb + 1, (), generator=g)) if masked else nb
            sigma = torch.rand((), generator=g).item() * noise_max
            keeps.append(k)
            noises.append(torch.randn((c, h, w), generator=g) * sigma)
        return BandPlan(keep=torch.tensor(keeps, dtype=torch.long), noise=torch.stack(noises))

    def kept_fraction(self, plan: BandPlan, grid: tuple[int, int]) -> Tensor:
        """Share of bands (fft) or coefficients (dct) each sample kept, (B,) in (0, 1]."""
        total = self.modulator.n_bands if self.modulator.kind == "fft" else grid[0] * grid[1]
        return plan.keep.float() / total


def build_uae(cfg: Mapping[str, Any], *, weights_dir=None, device="cpu", teacher: bool = True,
              random_encoder: bool = False) -> UAE:
    """Build a UAE from a run configuration (see :mod:`prism_probe.uae.train` for the keys).

    Parameters
    ----------
    cfg : mapping
        Needs ``encoder`` (``name``, optional ``input_size``), ``image_size``, ``modulator`` and
        ``decoder``.
    weights_dir : path, optional
        Searched first for the encoder's weights (e.g. ``../shared/weights``).
    teacher : bool
        Build the frozen teacher too (training); inference leaves it out.
    random_encoder : bool
        Build the encoder with random weights whatever its name says (when a checkpoint will
        overwrite them anyway, as the ``uae`` backend does).
    """
    from ..loading import load_encoder

    enc_cfg = cfg["encoder"]
    name = str(enc_cfg["name"])
    if random_encoder and not name.startswith("random:"):
        name = "random:" + name
    image_size = _hw(cfg["image_size"])
    input_size = _hw(enc_cfg.get("input_size") or image_size)
    student = load_encoder(name, weights_dir=weights_dir, device=device, image_size=input_size)
    enc = TokenGridEncoder(student, input_size)
    tea = None
    if teacher:
        other = load_encoder(name, weights_dir=weights_dir, device=device,
                             image_size=input_size)
        # Random-weight encoders draw new weights on every load: copy the student's.
        other.model.load_state_dict(student.model.state_dict())
        tea = TokenGridEncoder(other, input_size)
    probe = _find_unused(enc, image_size)
    if probe.ndim != 4:
        raise PrismError(f"encoder '{name}' does not give a token grid (got shape "
                         f"{tuple(probe.shape)}); pick an encoder with a spatial feature map")
    c, h, w = probe.shape[1:]
    mod_cfg = dict(cfg.get("modulator", {}))
    modulator = BandModulator(c, (h, w), kind=mod_cfg.get("kind", "dct"),
                              edges=mod_cfg.get("edges"),
                              fusion_hidden=mod_cfg.get("fusion_hidden"))
    decoder = build_decoder(cfg["decoder"], c, (h, w), image_size)
    model = UAE(enc, tea, modulator, decoder, image_size)
    return model.to(device)


def _find_unused(enc: TokenGridEncoder, image_size: tuple[int, int]) -> Tensor:
    """Run the encoder once with gradients; record parameters that do not reach its token grid
    (a classifier head, a pooling norm) in ``enc.unused``, which stages never unfreeze (under
    DistributedDataParallel a trainable parameter without a gradient is an error).
    Returns the (1, C, h, w) probe output, detached."""
    params = dict(enc.net.named_parameters())
    flags = {k: p.requires_grad for k, p in params.items()}
    enc.net.requires_grad_(True)
    with torch.enable_grad():  # callers may be inside no_grad (evaluation, the backend)
        out = enc(torch.zeros(1, 3, *image_size, device=enc.scale.device))
        if out.ndim == 4:
            out.float().sum().backward()
    enc.unused = {k for k, p in params.items() if p.grad is None}
    for k, p in params.items():
        p.grad = None
        p.requires_grad_(flags[k])
    return out.detach()


def _hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]),
                                                                          int(size[1]))
