"""Video: clips from files, frame folders or a still image's known motion; spatiotemporal spectra.

>>> from prism_probe.video import collect_clips, measure_video_spectra
>>> clips = collect_clips(["walk.mp4"], frames=16)                       # doctest: +SKIP
>>> profiles = measure_video_spectra(["videomae-b", "dinov2-b"], clips)  # doctest: +SKIP

Clips
-----
- A video file is decoded through PyAV (torchvision here has no video reader): one clip per file,
  ``frames`` frames taken every ``step`` decoded frames from the start. A file with too few
  frames is skipped and counted, as an unreadable image is.
- A folder of image files (sorted by name) is one video, sampled the same way.
- ``synthetic_motion="pan"`` makes a clip from each still image by translating a crop window by
  ``speed`` whole pixels per frame (to the right: content moves left), so a spatial frequency
  ``f_x`` (cycles per pixel) appears at temporal frequency ``f_x · speed`` cycles per frame
  (aliased into [-0.5, 0.5]); ``"zoom"`` scales about the centre by ``zoom`` per frame.

Encoders
--------
A video entry (``modality: video``) encodes the clip as a whole. Any image entry is applied frame
by frame (:class:`FrameEncoder`): its feature maps stacked over frames form a (C, T, h, w) grid
with one temporal cell per frame, the comparison without temporal modelling. Frequencies are
reported in cycles per cell (``temporal_freqs``: per temporal cell, a tubelet for VideoMAE) and
per frame (``temporal_freqs_frame``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ImageSourceError, PrismError
from .spectra_nd import SpatiotemporalAccumulator, VideoSpectrumConfig, temporal_band_filter

log = logging.getLogger("prism_probe")

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MOTIONS = ("pan", "zoom")


class VideoReadError(PrismError):
    """A video or frame folder could not be read into a clip (callers skip and count it)."""


# ------------------------------------------------------------------------------------------------
# Reading


def read_video(path: str | Path, frames: int, step: int = 1) -> list[Image.Image]:
    """Decode ``frames`` RGB frames, every ``step``-th from the first, with PyAV.

    Parameters
    ----------
    path : path of a video file (any container and codec FFmpeg decodes).
    frames : int
        Frames in the clip.
    step : int
        Decoded frames between clip frames (1: consecutive).

    Returns
    -------
    list of PIL.Image (RGB), length ``frames``.

    Raises
    ------
    VideoReadError
        The file cannot be decoded or holds fewer than ``(frames - 1) * step + 1`` frames.
    """
    import av

    need = (frames - 1) * step + 1
    out: list[Image.Image] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if i % step == 0:
                    out.append(frame.to_image().convert("RGB"))
                if len(out) == frames:
                    break
    except VideoReadError:
        raise
    except Exception as exc:  # PyAV raises its own error types for bad files
        raise VideoReadError(f"{path}: cannot decode video ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None
    if len(out) < frames:
        raise VideoReadError(f"{path}: has {len(out)} usable frames at step {step}; a clip of "
                             f"{frames} needs {need} decoded frames")
    return out


def read_frame_folder(folder: str | Path, frames: int, step: int = 1) -> list[Image.Image]:
    """The first ``frames`` frames (every ``step``-th) of a folder of images sorted by name."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    picked = files[: (frames - 1) * step + 1: step]
    if len(picked) < frames:
        raise VideoReadError(f"{folder}: {len(files)} frame images; a clip of {frames} at step "
                             f"{step} needs {(frames - 1) * step + 1}")
    out = []
    for p in picked:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except OSError as exc:
            raise VideoReadError(f"{p}: cannot read frame ({exc})") from None
    return out


def synthetic_clip(image: Image.Image, motion: str, frames: int, *, size: int = 224,
                   speed: int = 4, zoom: float = 1.03) -> list[Image.Image]:
    """A clip of a still image under a known camera motion.

    Parameters
    ----------
    image : PIL.Image
    motion : {"pan", "zoom"}
        ``pan``: a ``size``×``size`` window moved right by ``speed`` whole pixels per frame over
        the image resized (shorter side) to cover the path, so frame i is frame 0 shifted left
        by ``i · speed`` px exactly. ``zoom``: frame i is the centre crop of side
        ``size' / zoom**i`` of the image resized to ``size' = size``, resized back to ``size``
        (bicubic), a zoom-in by ``zoom`` per frame.
    frames : int
    size : int
        Frame side in pixels.
    speed : int
        Pan speed, pixels per frame (at ``size``).
    zoom : float
        Zoom factor per frame (> 1 zooms in).

    Returns
    -------
    list of PIL.Image (RGB), ``frames`` frames of ``size``×``size``.
    """
    if motion not in MOTIONS:
        raise PrismError(f"--synthetic-motion {motion!r}: use one of {', '.join(MOTIONS)}")
    if not isinstance(speed, int) or speed < 0:
        raise PrismError(f"pan speed {speed!r} must be a whole number of pixels per frame >= 0")
    img = image.convert("RGB")
    if motion == "pan":
        width = size + speed * (frames - 1)
        scale = max(width / img.width, size / img.height)
        img = img.resize((max(width, round(img.width * scale)),
                          max(size, round(img.height * scale))), Image.BICUBIC)
        top = (img.height - size) // 2
        return [img.crop((i * speed, top, i * speed + size, top + size)) for i in range(frames)]
    if not zoom > 0:
        raise PrismError(f"zoom factor {zoom!r} must be > 0")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                     Image.BICUBIC)
    cx, cy = img.width / 2, img.height / 2
    out = []
    for i in range(frames):
        half = size / zoom**i / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        out.append(img.resize((size, size), Image.BICUBIC, box=box))
    return out


@dataclass
class Clip:
    """One clip to measure: a name and a function giving its frames (read lazily)."""

    name: str
    load: Callable[[], list[Image.Image]]
    digest: str


@dataclass
class ClipSet:
    """The clips of a run and how they were made (recorded in every profile)."""

    clips: list[Clip]
    source: str
    frames: int
    step: int
    motion: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def digest(self) -> str:
        h = hashlib.sha256(f"{self.frames}/{self.step}/{self.motion}".encode())
        for c in self.clips:
            h.update(c.digest.encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n_clips": len(self.clips), "frames": self.frames,
                "frame_step": self.step, "synthetic_motion": self.motion,
                "names": [c.name for c in self.clips], "digest": self.digest}


def _file_digest(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                h.update(p.name.encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def collect_clips(
    videos: Sequence[str | Path] | None = None,
    *,
    frames: int = 16,
    step: int = 1,
    synthetic_motion: str | None = None,
    images=None,
    size: int = 224,
    speed: int = 4,
    zoom: float = 1.03,
    limit: int | None = None,
    seed: int = 0,
) -> ClipSet:
    """The clips of a run: video files and frame folders, or still images put in motion.

    Parameters
    ----------
    videos : paths
        Video files, frame folders, or folders holding video files (one clip per file).
    frames, step : int
        Frames per clip and decoded frames between them.
    synthetic_motion : {"pan", "zoom"}, optional
        Make clips from ``images`` (any source :func:`prism_probe.data.collect_images` takes;
        default its sample photos) instead of reading videos.
    size, speed, zoom
        Frame side (px) and motion of synthetic clips (:func:`synthetic_clip`).
    limit, seed
        Use at most ``limit`` clips (seeded subsample of the still images for synthetic clips;
        the first ``limit`` videos otherwise).
    """
    if frames < 1 or step < 1:
        raise PrismError(f"--frames {frames} and --frame-step {step} must be >= 1")
    if synthetic_motion is not None:
        from .data import collect_images, read_image

        if synthetic_motion not in MOTIONS:
            raise PrismError(f"--synthetic-motion {synthetic_motion!r}: use one of "
                             f"{', '.join(MOTIONS)}")
        stills = collect_images(images, limit=limit, seed=seed)
        motion = {"kind": synthetic_motion, "size": size,
                  **({"speed_px_per_frame": speed} if synthetic_motion == "pan"
                     else {"zoom_per_frame": zoom})}
        clips = []
        for path in stills:
            def load(p=path):
                return synthetic_clip(read_image(p), synthetic_motion, frames, size=size,
                                      speed=speed, zoom=zoom)
            clips.append(Clip(Path(path).name, load, _file_digest(Path(path))))
        return ClipSet(clips, f"synthetic {synthetic_motion} of {stills.to_dict().get('source')}",
                       frames, 1, motion)
    if not videos:
        raise ImageSourceError("no video given: name files or frame folders with --video, or "
                               "make clips from stills with --synthetic-motion pan|zoom")
    clips, missing = [], []
    for item in videos:
        path = Path(item)
        if not path.exists():
            missing.append(str(path))
            continue
        if path.is_dir():
            inner = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
            if inner:
                targets = [(p, False) for p in inner]
            else:
                targets = [(path, True)]
        else:
            targets = [(path, False)]
        for p, is_folder in targets:
            def load(p=p, is_folder=is_folder):
                reader = read_frame_folder if is_folder else read_video
                return reader(p, frames, step)
            clips.append(Clip(p.name, load, _file_digest(p)))
    if missing and not clips:
        raise ImageSourceError(f"--video: {missing[0]} does not exist")
    if missing:
        log.warning("--video: %d path(s) do not exist and are left out: %s", len(missing),
                    ", ".join(missing))
    if limit is not None:
        clips = clips[:limit]
    return ClipSet(clips, ", ".join(str(v) for v in videos), frames, step, None, missing)


# ------------------------------------------------------------------------------------------------
# Encoders


class FrameEncoder:
    """An image encoder applied to every frame of a clip, giving a (B, C, T, h, w) grid."""

    modality = "video"
    temporal_stride = 1
    num_frames = None

    def __init__(self, image_encoder):
        self.image = image_encoder
        self.label = image_encoder.label
        self.preprocess = image_encoder.preprocess
        self.entry = image_encoder.entry

    @property
    def device(self):
        return self.image.device

    def encode(self, clips: torch.Tensor):
        """Feature grids of clips (B, T, 3, H, W), frames encoded independently."""
        b, t = clips.shape[:2]
        fmap = self.image.encode(clips.reshape(b * t, *clips.shape[2:]))
        x = fmap.tensor
        fmap.tensor = x.reshape(b, t, *x.shape[1:]).transpose(1, 2).contiguous()
        fmap.meta = {**fmap.meta, "temporal_stride": 1, "per_frame": True}
        return fmap

    def describe(self) -> dict[str, Any]:
        return {**self.image.describe(), "applied": "per frame"}


def load_video_encoder(spec, *, registry=None, weights_dir=None, device="cpu"):
    """A video entry's encoder, or an image entry wrapped in :class:`FrameEncoder`."""
    from .loading import load_encoder
    from .registry import Registry, parse_spec

    registry = registry or Registry.load()
    if isinstance(spec, str):
        spec = parse_spec(spec, registry)
    modality = spec.entry.modality
    if modality == "sequence":
        raise PrismError(f"'{spec.text}' is a sequence model; measure it with --text FILE, "
                         "not --video")
    enc = load_encoder(spec, registry=registry, weights_dir=weights_dir, device=device)
    return enc if modality == "video" else FrameEncoder(enc)


def clip_tensor(frames: list[Image.Image], preprocess) -> torch.Tensor:
    """(T, 3, H, W) of a clip, every frame preprocessed the encoder's image way."""
    return torch.stack([preprocess(f) for f in frames])


def _batches(clips: ClipSet, preprocess, batch_size: int):
    batch, names = [], []
    for clip in clips.clips:
        try:
            frames = clip.load()
        except (VideoReadError, PrismError, OSError) as exc:
            yield None, (clip.name, str(exc))
            continue
        batch.append(clip_tensor(frames, preprocess))
        names.append(clip.name)
        if len(batch) == batch_size:
            yield torch.stack(batch), names
            batch, names = [], []
    if batch:
        yield torch.stack(batch), names


# ------------------------------------------------------------------------------------------------
# Measuring


def measure_video_encoder(encoder, clips: ClipSet, *,
                          config: VideoSpectrumConfig = VideoSpectrumConfig(),
                          batch_size: int = 4, progress=None):
    """Measure one loaded video (or per-frame) encoder on ``clips``; returns a Profile."""
    from .loading.base import check_finite
    from .measure import _autocast
    from .profile import Profile, library_versions

    need = getattr(encoder, "num_frames", None)
    if need is not None and need != clips.frames:
        raise PrismError(f"'{encoder.label}' takes clips of {need} frames; these have "
                         f"{clips.frames} (use --frames {need})")
    amp, dtype_used = _autocast(encoder.device, "auto")
    acc = SpatiotemporalAccumulator(config)
    first, skipped, used = None, [], 0
    task = progress.add_task(encoder.label, total=len(clips)) if progress else None
    for b, (batch, names) in enumerate(_batches(clips, encoder.preprocess, batch_size)):
        if batch is None:
            skipped.append(names)
            continue
        with amp:
            fmap = encoder.encode(batch)
        fmap.tensor = fmap.tensor.float()
        check_finite(fmap, encoder=encoder.label, batch=b)
        if first is None:
            first = fmap
        acc.update(fmap.tensor)
        used += len(names)
        if progress:
            progress.update(task, advance=len(names))
    if first is None:
        raise PrismError(f"no clip could be read for '{encoder.label}' "
                         f"({len(skipped)} skipped: {skipped[0][1] if skipped else 'none'})")
    log.info("%s: %d clips used, %d skipped", encoder.label, used, len(skipped))
    result = acc.result()
    stride = float(first.stride)
    tstride = int(first.meta.get("temporal_stride", 1))
    result["freqs_pixel"] = [f / stride for f in result["freqs"]]
    result["temporal_freqs_frame"] = [f / tstride for f in result["temporal_freqs"]]
    t, h, w = first.tensor.shape[-3:]
    protocol = {
        "modality": "video",
        "measure": "3-D power spectrum over (t, h, w): spatial radial, temporal, map",
        "spectrum": config.to_dict(),
        "units": "cell",
        "grid_mode": "native",
        "feature_grid": [t, h, w],
        "grid": [h, w],
        "stride_px": stride,
        "temporal_stride_frames": tstride,
        "per_frame": bool(first.meta.get("per_frame", False)),
        "frames": clips.frames,
        "frame_step": clips.step,
        "input_size": list(encoder.preprocess.size),
        "layer": first.layer,
        "prefix_tokens_dropped": first.prefix_tokens,
        "dtype": dtype_used,
    }
    images = {**clips.to_dict(), "n_used": used, "n_skipped": len(skipped), "skipped": skipped}
    env = library_versions()
    env.update(device=str(encoder.device), batch_size=batch_size,
               threads=torch.get_num_threads())
    try:
        import av

        env["av"] = av.__version__
    except ImportError:
        pass
    return Profile(kind="spectrum", encoder=encoder.describe(), protocol=protocol,
                   images=images, result=result, environment=env)


def measure_video_spectra(encoders: Sequence[str], clips: ClipSet, *, registry=None,
                          weights_dir=None, device: str = "auto", seed: int = 0,
                          config: VideoSpectrumConfig = VideoSpectrumConfig(),
                          batch_size: int = 4, progress=None) -> list:
    """Measure each encoder (video entries, or image entries per frame) on the same clips."""
    from .loading import resolve_device
    from .registry import Registry, parse_spec

    if not encoders:
        raise PrismError("name the encoders to measure on video, e.g. videomae-b dinov2-b")
    registry = registry or Registry.load()
    specs = [parse_spec(e, registry) for e in encoders]
    dev = str(resolve_device(device))
    profiles = []
    for spec in specs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = load_video_encoder(spec, registry=registry, weights_dir=weights_dir,
                                     device=dev)
        profiles.append(measure_video_encoder(enc, clips, config=config, batch_size=batch_size,
                                              progress=progress))
        del enc
    return profiles


# ------------------------------------------------------------------------------------------------
# Temporal ablation


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(2), b.flatten(2)  # (B, C, cells): cosine over channels per cell
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def ablate_video(encoder, clips: ClipSet, cutoffs: Sequence[float], *, band: str = "low",
                 mode: str = "tokens", layer: int = 0, transition: float = 0.0,
                 batch_size: int = 4) -> dict[str, Any]:
    """Temporal band ablation: what the final features lose when time is filtered.

    Parameters
    ----------
    encoder : a video encoder (``tokens`` mode) or any video/per-frame encoder (``input``).
    cutoffs : cycles per temporal cell (``tokens``) or per frame (``input``).
    band : {"low", "high"}
        Which band is kept (a low-pass keeps ``|f_t| <= cutoff``).
    mode : {"tokens", "input"}
        ``tokens``: filter the output tokens of block ``layer`` along time (reshaped to the
        (t, h, w) grid) inside the forward pass, which then continues through the later blocks.
        ``input``: filter the preprocessed frames along time before the encoder.
    layer : int
        Block index for ``tokens`` mode.

    Returns
    -------
    dict
        ``cutoffs``; ``cosine``: mean over clips and cells of the cosine similarity (over
        channels) between ablated and clean final feature grids; ``relative_change``:
        ``||ablated - clean|| / ||clean||``; ``kept_energy``: share of the filtered quantity's
        energy that the band keeps; plus the settings.
    """
    if mode not in ("tokens", "input"):
        raise PrismError(f"mode {mode!r}: use tokens or input")
    blocks = getattr(encoder, "blocks", None)
    if mode == "tokens" and not blocks:
        raise PrismError(f"'{encoder.label}' has no token blocks to filter (per-frame image "
                         "encoders have no temporal forward pass); use mode='input'")
    if mode == "tokens" and not -len(blocks) <= layer < len(blocks):
        raise PrismError(f"layer {layer}: '{encoder.label}' has blocks 0..{len(blocks) - 1}")
    state: dict[str, Any] = {"cutoff": None}

    def hook(_module, _inputs, output):
        if state["cutoff"] is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        b, n, c = hidden.shape
        t = state["grid"][0]
        x = hidden.reshape(b, t, n // t, c)
        y = temporal_band_filter(x, state["cutoff"], band, transition=transition)
        state["kept"].append((float(y.square().sum()), float(x.square().sum())))
        y = y.reshape(b, n, c)
        return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y

    handle = blocks[layer].register_forward_hook(hook) if mode == "tokens" else None
    cos = {c: [] for c in cutoffs}
    rel = {c: [] for c in cutoffs}
    kept = {c: [] for c in cutoffs}
    try:
        with torch.no_grad():
            for batch, names in _batches(clips, encoder.preprocess, batch_size):
                if batch is None:
                    continue
                state["cutoff"] = None
                clean = encoder.encode(batch).tensor.float()
                state["grid"] = tuple(clean.shape[-3:])
                for c in cutoffs:
                    state["cutoff"], state["kept"] = (c if mode == "tokens" else None), []
                    if mode == "input":
                        x = batch.transpose(1, 2)  # (B, 3, T, H, W): time on dim 2
                        mean = x.mean(dim=2, keepdim=True)
                        y = temporal_band_filter(x - mean, c, band, transition=transition)
                        # The clip's static frame is the DC; keep it for a low-pass.
                        y = y + mean if band == "low" else y
                        kept[c].append(float(y.square().sum()) / max(float(x.square().sum()),
                                                                     1e-30))
                        out = encoder.encode(y.transpose(1, 2).contiguous()).tensor.float()
                    else:
                        out = encoder.encode(batch).tensor.float()
                        e_kept, e_all = map(sum, zip(*state["kept"]))
                        kept[c].append(e_kept / max(e_all, 1e-30))
                    cos[c].append(_cosine(out, clean))
                    rel[c].append(float((out - clean).norm() / clean.norm().clamp_min(1e-30)))
    finally:
        if handle is not None:
            handle.remove()
    return {"mode": mode, "band": band, "layer": layer if mode == "tokens" else None,
            "transition": transition,
            "units": "cycles per temporal cell" if mode == "tokens" else "cycles per frame",
            "cutoffs": list(cutoffs),
            "cosine": [float(np.mean(cos[c])) for c in cutoffs],
            "relative_change": [float(np.mean(rel[c])) for c in cutoffs],
            "kept_energy": [float(np.mean(kept[c])) for c in cutoffs]}


def video_table(profiles):
    """One row per encoder: grid, clips, spatial and temporal summaries with intervals."""
    from rich.table import Table

    table = Table(title="Spatiotemporal feature spectra (cycles per cell; temporal per "
                  "temporal cell)", caption="values: mean over clips [95 % interval]")
    for col in ("encoder", "grid t×h×w", "clips", "low share", "centroid", "slope",
                "static share", "temporal low share", "temporal centroid"):
        table.add_column(col, justify="left" if col == "encoder" else "right")
    for p in profiles:
        row = [p.label, "×".join(map(str, p.protocol["feature_grid"])), str(p.images["n_used"])]
        for key in ("low_band_share", "centroid", "slope", "static_share",
                    "temporal_low_band_share", "temporal_centroid"):
            s = p.result["summaries"][key]
            if s["mean"] is None:
                row.append("—")
            elif s["ci95"] is None:
                row.append(f"{s['mean']:.3f}")
            else:
                row.append(f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]")
        table.add_row(*row)
    return table


def frames_of(image_array: np.ndarray) -> list[Image.Image]:
    """PIL frames of a (T, H, W, 3) uint8 array (for building clips in memory)."""
    if image_array.ndim != 4 or image_array.shape[-1] != 3:
        raise PrismError(f"frames must be (T, H, W, 3) uint8, got {image_array.shape}")
    return [Image.fromarray(np.ascontiguousarray(f)) for f in image_array]


def in_memory_clips(arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> ClipSet:
    """A :class:`ClipSet` of clips given as (T, H, W, 3) uint8 arrays."""
    names = names or [f"clip{i}" for i in range(len(arrays))]
    frames = {a.shape[0] for a in arrays}
    if len(frames) != 1:
        raise PrismError(f"clips have different frame counts {sorted(frames)}")
    clips = [Clip(n, (lambda a=a: frames_of(a)), hashlib.sha256(a.tobytes()).hexdigest())
             for a, n in zip(arrays, names)]
    return ClipSet(clips, "in-memory arrays", frames.pop(), 1)


__all__ = ["ClipSet", "Clip", "FrameEncoder", "VideoReadError", "ablate_video", "clip_tensor",
           "collect_clips", "in_memory_clips", "load_video_encoder", "measure_video_encoder",
           "measure_video_spectra", "read_frame_folder", "read_video", "synthetic_clip",
           "video_table"]
