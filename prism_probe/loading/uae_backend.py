"""The ``uae`` backend: a UAE run folder trained by ``prism-probe train-uae``, as an encoder.

Name it ``uae:RUN`` (RUN is the run folder), e.g. ``prism-probe spectrum uae:runs/tiny
resnet56-cifar taef2``. The weights are the EMA weights of the run's last committed checkpoint;
images are fed at the run's image size (shorter side resized, centre crop, values in [0, 1]).

Feature layers (``features.layer``; a registry entry with ``base: uae`` can set it):

- ``latent`` (default): the unified encoder's token grid, (B, C, h, w), before the modulator;
- ``modulated``: the modulator's output with all bands and no noise (what the decoder sees);
- ``band0``, ``band1``, …: band k of the latent from the run's own split (FFT rings or DCT
  zig-zag, :mod:`prism_probe.bands`); the bands sum to ``latent``.

A registry file (``--registry FILE``) names a band of a run, e.g.::

    encoders:
      tiny-uae-band0: {base: uae, id: runs/tiny, features: {layer: band0}}

``decode(latent)`` runs the modulator and decoder and returns images in [0, 1], so latent
ablations apply; decoding ``band0`` alone reconstructs from the semantic band.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PrismError
from ..registry import EncoderEntry
from ..weights import ResolvedWeights, sha256_file
from .base import Encoder, FeatureMap, WeightsInfo


def build(entry: EncoderEntry, *, weights: ResolvedWeights, device, image_size=None,
          dirs=()) -> Encoder:
    """Load the run folder ``entry.id`` (see the module docstring)."""
    from ..data import Preprocess
    from ..uae.eval import load_run

    run = Path(str(entry.id)).expanduser()
    if not (run / "checkpoint.json").is_file():
        raise PrismError(f"uae:{entry.id}: {run} is not a UAE run folder with a checkpoint "
                         "(train one with `prism-probe train-uae --out RUN`)")
    model, cfg, record = load_run(run, device=device)
    layer = str(entry.features.get("layer", "latent"))
    n_bands = model.modulator.n_bands
    allowed = ["latent", "modulated"] + [f"band{k}" for k in range(n_bands)]
    if layer not in allowed:
        raise PrismError(f"uae:{entry.id}: features.layer {layer!r} is not one of "
                         f"{', '.join(allowed)}")
    size = image_size or (int(cfg["image_size"]),) * 2
    preprocess = Preprocess(size=size, resize="shorter", value_range=(0.0, 1.0))

    @torch.no_grad()
    def forward(pixels: torch.Tensor) -> FeatureMap:
        z = model.encode(pixels).float()
        if layer == "modulated":
            z = model.modulator(z)
        elif layer.startswith("band"):
            z = model.modulator.split(z)[int(layer[4:])]
        return FeatureMap(z, layer=layer, stride=pixels.shape[-1] / z.shape[-1],
                          meta={"modulator": model.modulator.kind, "step": record["step"]})

    @torch.no_grad()
    def decode(latent: torch.Tensor) -> torch.Tensor:
        return model.decode(latent.float()).float().clamp(0, 1)

    path = run / record["weights"]
    info = WeightsInfo("file", str(path), sha256_file(path))
    return Encoder(entry, model, preprocess, forward, weights=info, decode=decode,
                   library={"torch": torch.__version__, "uae_encoder": str(cfg["encoder"]
                                                                           ["name"])})
