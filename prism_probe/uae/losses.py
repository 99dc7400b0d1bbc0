"""UAE losses: L1, perceptual, semantic (low band vs teacher), patch discriminator with hinge
loss and the adaptive GAN weight.

Reconstruction losses return one value per image (B,), so a caller can weight samples (the
FFT variant scales the masked pass by the share of bands each sample kept) before averaging.

Perceptual loss
---------------
``kind: lpips`` uses the ``lpips`` package (AlexNet backbone plus its learned linear layers).
LPIPS needs torchvision's ImageNet AlexNet weights in the torch hub cache; the package would
download them otherwise, which this toolkit never does behind a user's back. ``kind: auto`` takes
LPIPS when those weights are present and otherwise the documented fallback ``kind: features``:
the LPIPS recipe (unit-normalise each position's channel vector, squared difference, mean over
positions, sum over layers) applied to the feature maps of a registered encoder: either the
run's frozen teacher (``encoder: teacher``) or any registry name. For a CIFAR ResNet teacher the
layers are its stages ``conv1``, ``layer1``, ``layer2`` and ``layer3``; other encoders give
their feature map. Which loss was used is returned by :func:`build_perceptual` as ``.describe()``
and recorded in the run's ``config.json`` and every checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PrismError

log = logging.getLogger("prism_probe")

__all__ = [
    "l1_per_image",
    "FeaturePerceptual",
    "LPIPSPerceptual",
    "build_perceptual",
    "semantic_loss",
    "PatchDiscriminator",
    "hinge_d_loss",
    "hinge_g_loss",
    "adaptive_weight",
    "band_cosine",
]


def l1_per_image(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute error of each image, (B,), for x, y (B, 3, H, W)."""
    return (x - y).abs().flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------
# Perceptual


def _unit(f: Tensor, eps: float = 1e-10) -> Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class FeaturePerceptual(nn.Module):
    """LPIPS-style distance in a frozen encoder's feature maps (the fallback perceptual loss).

    Parameters
    ----------
    net : TokenGridEncoder
        A frozen encoder taking images in [0, 1] (it resizes and normalises itself).
    stages : list of str, optional
        For encoders with ``split`` (CIFAR ResNets): compute these intermediate maps too.
    split : callable, optional
        The backend's ``split(at)``; ``split(s)[0]`` maps normalised pixels to stage ``s``.
    label : str
        What to record (``features:resnet56-cifar[conv1,layer1,layer2,layer3]``).

    ``forward(x, y)`` gives (B,) distances for images x, y (B, 3, H, W) in [0, 1].
    """

    def __init__(self, net: nn.Module, *, stages=None, split=None, label: str = "features"):
        super().__init__()
        self.net = net
        self.net.requires_grad_(False)
        self.heads = [split(s)[0] for s in stages] if (split and stages) else None
        self.label = label

    def _maps(self, x: Tensor) -> list[Tensor]:
        if self.heads is None:
            return [self.net(x)]
        if tuple(x.shape[-2:]) != self.net.input_size:
            x = F.interpolate(x, size=self.net.input_size, mode="bilinear",
                              align_corners=False, antialias=True)
        x = x * self.net.scale + self.net.shift
        return [head(x) for head in self.heads]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance (B,) of reconstructions ``x`` to targets ``y``; no gradient flows to ``y``."""
        total = x.new_zeros(x.shape[0])
        with torch.no_grad():
            target = self._maps(y)
        for fx, fy in zip(self._maps(x), target):
            total = total + (_unit(fx) - _unit(fy)).pow(2).sum(1).flatten(1).mean(1)
        return total

    def describe(self) -> str:
        return self.label


class LPIPSPerceptual(nn.Module):
    """LPIPS (``lpips`` package) on images in [0, 1]; (B,) distances."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        import lpips

        self.net = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
        self.label = f"lpips:{net}"

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(x * 2 - 1, y * 2 - 1, normalize=False).flatten()

    def describe(self) -> str:
        return self.label


def lpips_available(net: str = "alex") -> bool:
    """True when ``lpips`` is installed and its torchvision backbone weights are cached."""
    try:
        import lpips  # noqa: F401
        import torchvision.models as tvm
    except ImportError:
        return False
    weights = {"alex": tvm.AlexNet_Weights.IMAGENET1K_V1,
               "vgg": tvm.VGG16_Weights.IMAGENET1K_V1,
               "squeeze": tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1}.get(net)
    if weights is None:
        return False
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return cached.is_file()


def build_perceptual(cfg: Mapping[str, Any], *, teacher=None, weights_dir=None,
                     device="cpu") -> nn.Module | None:
    """The perceptual loss named by ``cfg`` (``loss.perceptual``), or None when its weight is 0.

    Parameters
    ----------
    cfg : mapping
        ``kind`` (auto | lpips | features), ``net`` (LPIPS backbone, default alex),
        ``encoder`` (fallback encoder: ``teacher`` or a registry name), ``stages`` (list, for
        encoders with split points).
    teacher : TokenGridEncoder, optional
        The run's teacher, reused when ``encoder: teacher``.
    """
    kind = cfg.get("kind", "auto")
    net = cfg.get("net", "alex")
    if kind not in ("auto", "lpips", "features"):
        raise PrismError(f"loss.perceptual.kind {kind!r}: use auto, lpips or features")
    if kind in ("auto", "lpips"):
        if lpips_available(net):
            return LPIPSPerceptual(net).to(device)
        if kind == "lpips":
            raise PrismError(f"LPIPS needs torchvision's {net} ImageNet weights in "
                             f"{torch.hub.get_dir()}/checkpoints (not found, and not "
                             "downloaded); use loss.perceptual.kind=features or auto")
        log.info("LPIPS backbone weights not cached; perceptual loss falls back to feature "
                 "distance in %s", cfg.get("encoder", "teacher"))
    from ..loading import load_encoder
    from .model import TokenGridEncoder

    name = str(cfg.get("encoder", "teacher"))
    stages = list(cfg.get("stages") or [])
    if name == "teacher":
        if teacher is None:
            raise PrismError("loss.perceptual.encoder=teacher needs the run's teacher")
        enc_net, split = teacher, getattr(teacher, "split_fn", None)
        label_name = "teacher"
    else:
        loaded = load_encoder(name, weights_dir=weights_dir, device=device)
        enc_net = TokenGridEncoder(loaded, loaded.preprocess.size)
        split, label_name = loaded._split, name
    if stages and split is None:
        raise PrismError(f"perceptual encoder '{label_name}' has no split points; drop "
                         "loss.perceptual.stages")
    label = f"features:{label_name}" + (f"[{','.join(stages)}]" if stages else "")
    return FeaturePerceptual(enc_net, stages=stages or None, split=split,
                             label=label).to(device)


# ------------------------------------------------------------------------------------------------
# Semantic


def semantic_loss(student: Tensor, teacher: Tensor, modulator) -> Tensor:
    """MSE between the student's and the teacher's semantic band (scalar).

    ``fft`` (paper v1): mean squared difference of band 0 (the inner ring, from the residual
    split) over all its values. ``dct`` (v5): mean squared difference of the first
    ``K_base`` zig-zag DCT coefficients of every channel (the DCT is orthonormal, so this is
    the band-0 energy of the difference divided by B·C·K_base).
    """
    diff = student - teacher.detach()
    if modulator.kind == "fft":
        return modulator.band0(diff).pow(2).mean()
    from ..spectra import dct2, zigzag_order

    h, w = diff.shape[-2:]
    order = zigzag_order(h, w)[: modulator.base_coefficients].to(diff.device)
    coeffs = dct2(diff).flatten(-2)[..., order]
    return coeffs.pow(2).mean()


def band_cosine(student: Tensor, teacher: Tensor, modulator) -> Tensor:
    """Cosine similarity (B,) between student and teacher semantic bands, each flattened."""
    a = modulator.band0(student).flatten(1)
    b = modulator.band0(teacher).flatten(1)
    return F.cosine_similarity(a, b, dim=1)


# ------------------------------------------------------------------------------------------------
# Adversarial


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: stride-2 convs, LeakyReLU, one logit per patch.

    No normalisation layers: a batch statistic would make the loss depend on how a batch is
    split over processes. Takes images (B, 3, H, W) in [0, 1]; returns logits (B, 1, h, w).
    """

    def __init__(self, width: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(1, layers):
            mods += [nn.Conv2d(ch, min(ch * 2, 512), 4, 2, 1), nn.LeakyReLU(0.2)]
            ch = min(ch * 2, 512)
        mods += [nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2 - 1)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss −E[D(x̂)]."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, *,
                    max_weight: float = 1e4, eps: float = 1e-4, world_size: int = 1) -> Tensor:
    """λ = ‖∇_w L_rec‖ / (‖∇_w L_gan‖ + eps) at the decoder's last-layer weight w, clamped.

    Parameters
    ----------
    rec_loss, gan_loss : Tensor ()
        The reconstruction and generator losses (graphs kept: they are differentiated again).
    last_layer : Tensor
        The decoder's last layer weight.
    world_size : int
        Under torch.distributed, each gradient is averaged over processes before its norm, so
        the weight equals the one a single process computes on the whole batch.

    Returns
    -------
    Tensor ()
        Detached λ in [0, max_weight].
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if world_size > 1:
        import torch.distributed as dist

        both = torch.stack([g_rec, g_gan])
        dist.all_reduce(both)
        g_rec, g_gan = both[0] / world_size, both[1] / world_size
    lam = g_rec.norm() / (g_gan.norm() + eps)
    return lam.clamp(0.0, max_weight).detach()
