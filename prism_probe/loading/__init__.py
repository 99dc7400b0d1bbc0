"""Loading encoders: one module per backend, each with ``build(entry, weights, ...)``.

``load_encoder("dinov2-b")`` resolves the registry entry, finds its weights
(:mod:`prism_probe.weights`) and hands both to the backend named by the entry. Backends import
their library lazily, so a missing optional library is reported only for the entries that need it.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import PrismError
from ..registry import EncoderEntry, EncoderSpec, Registry, parse_spec

log = logging.getLogger("prism_probe")

_MODULES = {
    "timm": "timm_backend",
    "open_clip": "open_clip_backend",
    "transformers": "transformers_backend",
    "diffusers": "diffusers_backend",
    "tae": "tae",
    "cifar_resnet": "cifar_resnet",
    "torch_module": "torch_module",
    "pixels": "pixels",
    "uae": "uae_backend",
    "transformers_video": "video_backend",
    "transformers_sequence": "sequence_backend",
}
_PIP = {"timm": "timm", "open_clip": "open_clip_torch", "transformers": "transformers",
        "diffusers": "diffusers"}


def backend_module(name: str):
    try:
        return importlib.import_module(f"{__name__}.{_MODULES[name]}")
    except ModuleNotFoundError as exc:
        lib = exc.name.split(".")[0] if exc.name else name
        if lib in _PIP or lib in ("open_clip",):
            raise PrismError(f"backend '{name}' needs the package '{_PIP.get(lib, lib)}': "
                             f"pip install {_PIP.get(lib, lib)}") from None
        raise


def make_preprocess(entry: EncoderEntry, image_size=None, defaults: Mapping[str, Any] = ()):
    """The entry's preprocessing; keys it leaves out come from ``defaults`` (the library's own
    config for the model), then from the toolkit's defaults (ImageNet mean/std, bicubic)."""
    from ..data import Preprocess

    cfg = {"resize": "shorter", "crop_pct": 1.0, "interpolation": "bicubic"}
    cfg.update({k: v for k, v in dict(defaults).items() if v is not None})
    # frames / max_tokens describe clips and sequences, not how one image is preprocessed.
    cfg.update({k: v for k, v in entry.input.items() if k not in ("frames", "max_tokens")})
    if image_size is not None:
        cfg["size"] = image_size
    if "value_range" in cfg:
        cfg.pop("mean", None), cfg.pop("std", None)
        cfg["value_range"] = tuple(cfg["value_range"])
    else:
        cfg.setdefault("mean", (0.485, 0.456, 0.406))
        cfg.setdefault("std", (0.229, 0.224, 0.225))
        cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    size = cfg["size"]
    cfg["size"] = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocess(**cfg)


def resolve_device(device: str | None = "auto"):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrismError(f"--device {device}: no CUDA GPU is visible to torch here; use "
                         "--device cpu (or auto)")
    return dev


def load_encoder(
    spec: str | EncoderSpec,
    *,
    registry: Registry | None = None,
    weights_dir: Iterable[str | Path] | str | Path | None = None,
    device: str | None = "cpu",
    image_size: int | tuple[int, int] | None = None,
):
    """Build the encoder named by ``spec`` (``NAME``, ``random:NAME``, ``pixels:P``, ``uae:RUN``).

    ``image_size`` overrides the entry's input size; ``weights_dir`` is searched before any cache.
    Returns a :class:`prism_probe.loading.base.Encoder` in eval mode on ``device``.
    """
    from .. import weights as W

    if isinstance(spec, str):
        spec = parse_spec(spec, registry or Registry.load())
    entry = spec.entry
    dev = resolve_device(device)
    resolved = W.resolve(entry, dirs=weights_dir, random_init=spec.random_init)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    log.info("loading %s (%s backend, weights: %s)", spec.text, entry.backend,
             "random" if resolved.random else resolved.location or "none")
    module = backend_module(entry.backend)
    enc = module.build(entry, weights=resolved, device=dev, image_size=image_size,
                       dirs=W.weights_dirs(weights_dir))
    enc.label = spec.text
    return enc
