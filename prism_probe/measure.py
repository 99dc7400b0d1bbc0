"""Measuring spectra: encoders × images → profiles. The importable API behind ``spectrum``.

>>> from prism_probe.measure import measure_spectra
>>> profiles = measure_spectra(["resnet56-cifar", "taef2"], images="imgs/",
...                            weights_dir="weights/")          # doctest: +SKIP

Protocol, for every encoder: decode each image, preprocess it the encoder's way (its size, crop
and normalization), run the encoder, optionally pool the feature map to a common N×N grid
(adaptive average pooling, as the UAE paper compares encoders), then accumulate the spectra of
:mod:`prism_probe.spectra` over channels and images. Under ``torchrun`` each rank takes a strided
shard of the images and the accumulators are merged on every rank, so the profile equals a single
process's to float tolerance.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .data import DEFAULT_MAX_PIXELS, ImageList, collect_images, iterate_batches
from .errors import NumericsError, PrismError
from .loading import load_encoder, resolve_device
from .loading.base import Encoder, FeatureMap, check_finite
from .profile import Profile, library_versions
from .registry import Registry, parse_spec
from .spectra import SpectrumAccumulator, SpectrumConfig, SpectrumInputError

log = logging.getLogger("prism_probe")

UNITS = ("cell", "pixel")


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    initialised_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> "Distributed":
        """Join the process group ``torchrun`` describes in the environment, if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        mine = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            mine = True
        return cls(dist.get_rank(), dist.get_world_size(), mine)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def pool_to_grid(x: torch.Tensor, grid: int | None) -> torch.Tensor:
    """Adaptive average pooling to grid × grid; refuses to invent cells (grid > native)."""
    if grid is None:
        return x
    h, w = x.shape[-2:]
    if grid > h or grid > w:
        raise PrismError(f"--grid {grid} is finer than the feature grid {h}×{w}; pooling only "
                         f"coarsens: use --grid {min(h, w)} or less")
    if (h, w) == (grid, grid):
        return x
    return torch.nn.functional.adaptive_avg_pool2d(x, (grid, grid))


def _autocast(device: torch.device, dtype: str):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext(), "float32"
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise PrismError(f"--dtype {dtype}: use auto, float32, bfloat16 or float16")
    return torch.autocast(device.type, dtype=torch_dtype), dtype


def _encode_in_chunks(encoder: Encoder, pixels: torch.Tensor, chunk: int,
                      amp) -> tuple[FeatureMap, int]:
    """Encode ``pixels`` in pieces of at most ``chunk`` images, halving ``chunk`` on CUDA OOM.

    Returns the feature map of the whole batch and the chunk size that fitted, which the caller
    keeps for later batches (memory use does not shrink between batches). Spectra are per-image
    sums, so splitting a batch changes nothing but the summation order.
    """
    while True:
        try:
            parts = []
            for start in range(0, len(pixels), chunk):
                with amp:
                    parts.append(encoder.encode(pixels[start:start + chunk]))
            if len(parts) == 1:
                return parts[0], chunk
            first = parts[0]
            first.tensor = torch.cat([f.tensor for f in parts])
            return first, chunk
        except torch.cuda.OutOfMemoryError:
            parts = []
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if chunk == 1:
                raise PrismError(
                    f"encoder '{encoder.label}' ran out of GPU memory on {encoder.device} even "
                    "with one image per batch; use a smaller --image-size, --dtype bfloat16, "
                    "another GPU (--device cuda:N) or --device cpu") from None
            chunk = max(1, chunk // 2)
            log.warning("%s: out of GPU memory; retrying with batches of %d images",
                        encoder.label, chunk)


def measure_encoder(
    encoder: Encoder,
    images: ImageList,
    *,
    config: SpectrumConfig = SpectrumConfig(),
    grid: int | None = None,
    units: str = "cell",
    batch_size: int = 32,
    workers: int = 0,
    dtype: str = "auto",
    progress=None,
    dist: Distributed | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Profile:
    """Measure one loaded encoder on ``images`` and return its profile.

    ``units`` only changes how frequencies are reported: ``"cell"`` (cycles per grid cell) or
    ``"pixel"`` (cycles per input pixel = cycles per cell ÷ stride). ``config.low_cutoff`` is
    read in those units. ``max_pixels`` is the decompression-bomb guard of
    :func:`prism_probe.data.read_image` (None: Pillow's own limit only). A CUDA out-of-memory
    error halves the batch and retries, down to one image per batch.
    """
    if grid is not None and grid < 2:
        raise PrismError(f"--grid {grid}: a {grid}×{grid} grid has no spatial frequencies, so "
                         "no spectrum; use --grid 2 or more")
    if units not in UNITS:
        raise PrismError(f"--units {units}: use 'cell' (cycles per grid cell) or 'pixel' "
                         "(cycles per input pixel)")
    dist = dist or Distributed()
    amp, dtype_used = _autocast(encoder.device, dtype)
    stream = iterate_batches(images, encoder.preprocess, batch_size=batch_size, workers=workers,
                             rank=dist.rank, world_size=dist.world_size,
                             max_pixels=max_pixels)
    acc: SpectrumAccumulator | None = None
    first = None
    task = progress.add_task(encoder.label, total=stream.n_total) if progress else None
    chunk = batch_size
    for b, batch in enumerate(stream):
        fmap, chunk = _encode_in_chunks(encoder, batch.pixels, chunk, amp)
        fmap.tensor = fmap.tensor.float()
        check_finite(fmap, encoder=encoder.label, batch=b)
        if first is None:
            h, w = fmap.grid
            if h * w < 2:
                raise NumericsError(
                    f"encoder '{encoder.label}' gives a {h}×{w} feature grid (layer "
                    f"{fmap.layer}) at input {'×'.join(map(str, encoder.preprocess.size))} px: "
                    "one cell has no spectrum; use a larger --image-size or an earlier layer")
            first = fmap
            stride = fmap.stride
            if grid is not None:
                stride = encoder.preprocess.size[0] / grid
            cell_cfg = config
            if units == "pixel":
                # The accumulator works in cycles per cell; convert the cutoff and fit range.
                cell_cfg = SpectrumConfig(**{
                    **config.__dict__, "low_cutoff": config.low_cutoff * stride,
                    "slope_range": tuple(f * stride for f in config.slope_range)})
            acc = SpectrumAccumulator(cell_cfg)
        try:
            acc.update(pool_to_grid(fmap.tensor, grid))
        except SpectrumInputError as exc:
            # The spectra module speaks in API terms (slope_range); say which encoder, and what
            # a command-line user can change.
            raise NumericsError(f"encoder '{encoder.label}': {exc}; a larger --image-size (or "
                                "an earlier layer) gives a finer grid") from None
        if progress:
            progress.update(task, advance=len(batch) + len(batch.skipped))

    if progress:
        progress.update(task, completed=stream.n_total)
    parts = dist.gather((acc, stream.n_read, [(str(p), r) for p, r in stream.skipped]))
    accs = [a for a, _, _ in parts if a is not None]
    if not accs:
        raise PrismError(f"no image could be read for '{encoder.label}': "
                         f"{stream.summary()}")
    total = accs[0]
    for other in accs[1:]:
        total.merge(other)
    n_read = sum(n for _, n, _ in parts)
    skipped = [s for _, _, sk in parts for s in sk]
    result = total.result()
    result["freqs_pixel"] = [f / stride for f in result["freqs"]]
    # Summaries are computed in cycles per cell; the centroid is a frequency, so give it in
    # cycles per input pixel too (low-band share and slope are unit-free).
    cent = result["summaries"].get("centroid")
    if cent is not None:
        result["summaries"]["centroid_pixel"] = _scaled_summary(cent, 1.0 / stride)
    result["summary_units"] = {"centroid": "cycles/cell", "centroid_pixel": "cycles/px",
                               "low_band_share": "fraction", "slope": "log-log"}
    log.info("%s: %d images used, %d skipped", encoder.label, n_read, len(skipped))
    if result.get("n_zero_power"):
        log.warning("%s: %d of %d images gave feature maps with zero power (constant maps); "
                    "they count in the mean spectrum but not in the summaries and intervals",
                    encoder.label, result["n_zero_power"], n_read)

    protocol = {
        "measure": "radial power spectrum + DCT zig-zag band energy",
        "spectrum": config.to_dict(),
        "units": units,
        "grid_mode": "native" if grid is None else f"pooled {grid}x{grid}",
        "feature_grid": list(first.grid),
        "grid": list(pool_to_grid(first.tensor[:1], grid).shape[-2:]),
        "stride_px": stride,
        "input_size": list(encoder.preprocess.size),
        "layer": first.layer,
        "prefix_tokens_dropped": first.prefix_tokens,
        "dtype": dtype_used,
    }
    images_info = {**images.to_dict(), "n_used": n_read, "n_skipped": len(skipped),
                   "skipped": skipped, "duplicates": [list(g) for g in images.duplicates]}
    env = library_versions()
    env["device"] = str(encoder.device)
    env["world_size"] = dist.world_size
    # The process layout: on CPU, batch size and intra-op thread count can change float sums
    # (a different summation order), so a mismatch against a baseline should explain itself.
    env["batch_size"] = batch_size
    env["threads"] = torch.get_num_threads()
    env["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    return Profile(kind="spectrum", encoder=encoder.describe(), protocol=protocol,
                   images=images_info, result=result, environment=env)


def _scaled_summary(summary: dict | None, factor: float) -> dict | None:
    """A summary (mean, ci95, std) of a quantity multiplied by ``factor`` > 0."""
    if summary is None:
        return None
    out = dict(summary)
    for key in ("mean", "std"):
        if out.get(key) is not None:
            out[key] = out[key] * factor
    if out.get("ci95") is not None:
        out["ci95"] = [v * factor for v in out["ci95"]]
    return out


def preflight_weights(specs, weights_dir=None) -> None:
    """Fail at once when an encoder's weights cannot be had, before measuring any encoder.

    Only looks (no checksum, no download): weights present locally or in the hub cache pass;
    others pass only when they can still be downloaded (a URL or hub id, and not offline).
    """
    from . import weights as W

    dirs = W.weights_dirs(weights_dir)
    for spec in specs:
        entry = spec.entry
        if spec.random_init or entry.backend in ("pixels", "uae"):
            continue
        state, _ = W.presence(entry, dirs)
        if state != "missing":
            continue
        remote = any(entry.weights.get(k) for k in ("url", "hub", "tag"))
        if not remote:
            raise W.missing(entry, dirs)
        if W.offline():
            raise W.missing(entry, dirs, "offline, and not in any local folder or cache")


def default_encoders(registry: Registry, weights_dir=None) -> tuple[list[str], list[str]]:
    """``pixels`` plus every entry whose weights are present locally, and the ones left out."""
    from . import weights as W

    dirs = W.weights_dirs(weights_dir)
    chosen, left = ["pixels"], []
    for entry in registry:
        # Video and sequence entries need clips or token sequences, not images.
        if entry.backend in ("pixels", "uae") or entry.modality != "image":
            continue
        state, _ = W.presence(entry, dirs)
        (chosen if state in ("local", "cache") else left).append(entry.name)
    return chosen, left


def measure_spectra(
    encoders: Sequence[str] | None,
    images: str | Path | Sequence | ImageList | None = None,
    *,
    registry: Registry | None = None,
    weights_dir=None,
    device: str = "auto",
    image_size: int | tuple[int, int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    config: SpectrumConfig = SpectrumConfig(),
    grid: int | None = None,
    units: str = "cell",
    batch_size: int = 32,
    workers: int = 0,
    dtype: str = "auto",
    progress=None,
    dedupe: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Profile]:
    """Measure each encoder on the same images; returns one :class:`Profile` per encoder.

    ``encoders`` None or empty: ``pixels`` and every entry whose weights are present locally.
    ``seed`` also seeds the random weights of ``random:NAME`` encoders. ``dedupe`` drops files
    whose content repeats an earlier one's (duplicates are reported either way); ``max_pixels``
    is the decompression-bomb guard (see :func:`measure_encoder`).
    """
    registry = registry or Registry.load()
    if not encoders:
        encoders, left = default_encoders(registry, weights_dir)
        if left:
            log.warning("left out %d entries whose weights are not here (%s); give --weights DIR "
                        "or name them to download", len(left), ", ".join(left))
    specs = [parse_spec(e, registry) for e in encoders]  # validate all names before any work
    for spec in specs:
        if spec.entry.modality != "image":
            flag = "--video CLIP" if spec.entry.modality == "video" else "--text FILE"
            raise PrismError(f"'{spec.text}' is a {spec.entry.modality} encoder; measure it with "
                             f"{flag} (docs/modalities.md)")
    preflight_weights(specs, weights_dir)
    if not isinstance(images, ImageList):
        images = collect_images(images, limit=limit, seed=seed, dedupe=dedupe)
    dev = resolve_device(device)
    dist = Distributed.from_env(dev)
    profiles = []
    try:
        for spec in specs:
            # Random weights come from torch's global generator: seed a forked one with
            # ``seed`` so that a random:NAME profile is reproducible, leaving the caller's intact.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                enc = load_encoder(spec, registry=registry, weights_dir=weights_dir,
                                   device=str(dev), image_size=image_size)
            profiles.append(measure_encoder(
                enc, images, config=config, grid=grid, units=units, batch_size=batch_size,
                workers=workers, dtype=dtype, progress=progress, dist=dist,
                max_pixels=max_pixels))
            del enc
    finally:
        dist.close()
    return profiles


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
