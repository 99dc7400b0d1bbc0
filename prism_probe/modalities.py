"""What ``prism-probe spectrum`` does with ``--video``, ``--synthetic-motion`` or ``--text``.

The CLI hands these runs here so that the command stays a thin layer; each returns the profiles,
the table to print and the files written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import PrismError

# Image-only options of the spectrum command, with the values that mean "not given".
IMAGE_ONLY = {"grid": None, "units": "cell", "image_size": None, "dedupe": False,
              "max_pixels": None, "workers": 0}


def _refuse_image_options(given: dict[str, Any], what: str) -> None:
    for key, default in IMAGE_ONLY.items():
        if key in given and given[key] != default:
            flag = "--" + key.replace("_", "-")
            raise PrismError(f"{flag} applies to images only, not to {what}; drop it")


def run_spectrum(encoders: Sequence[str] | None, *, video: Sequence[str] | None = None,
                 synthetic_motion: str | None = None, text: str | Path | None = None,
                 frames: int | None = None, frame_step: int = 1, images=None,
                 limit: int | None = None, seed: int = 0, out=None, registry=None,
                 weights_dir=None, device: str = "auto", batch_size: int = 4,
                 window: str | None = "hann", remove_mean: bool = True, bands: int = 10,
                 cutoff: float = 0.125, progress=None, image_options: dict | None = None):
    """Measure video clips or token sequences; returns (profiles, table, written files)."""
    from .plot_nd import write_outputs_nd
    from .registry import Registry
    from .spectra import SpectrumConfig

    registry = registry or Registry.load()
    if text is not None and (video or synthetic_motion):
        raise PrismError("--text and --video/--synthetic-motion measure different inputs; run "
                         "them separately")
    if text is not None:
        from .sequence import measure_sequence_spectra, read_sequences, sequence_table
        from .spectra_nd import SequenceSpectrumConfig

        _refuse_image_options(image_options or {}, "sequences")
        seqs = read_sequences(text)
        if limit is not None:
            seqs = seqs[:limit]
        config = SequenceSpectrumConfig(window=window, remove_mean=remove_mean,
                                        n_dct_bands=bands, low_cutoff=cutoff,
                                        min_tokens=max(16, bands))
        profiles = measure_sequence_spectra(list(encoders or []), seqs, registry=registry,
                                            weights_dir=weights_dir, device=device, seed=seed,
                                            config=config, batch_size=batch_size,
                                            source=str(text), progress=progress)
        table = sequence_table(profiles)
    else:
        from .spectra_nd import VideoSpectrumConfig
        from .video import collect_clips, measure_video_spectra, video_table

        _refuse_image_options(image_options or {}, "video clips")
        if frames is None:
            # The first video entry named decides the clip length (VideoMAE needs its own).
            frames = 16
            for name in encoders or []:
                entry = registry.get(name.removeprefix("random:"))
                if entry.modality == "video" and entry.input.get("frames"):
                    frames = int(entry.input["frames"])
                    break
        clips = collect_clips(video, frames=frames, step=frame_step,
                              synthetic_motion=synthetic_motion, images=images, limit=limit,
                              seed=seed)
        config = VideoSpectrumConfig(SpectrumConfig(window=window, remove_mean=remove_mean,
                                                    n_dct_bands=bands, low_cutoff=cutoff),
                                     temporal_window=window)
        profiles = measure_video_spectra(list(encoders or []), clips, registry=registry,
                                         weights_dir=weights_dir, device=device, seed=seed,
                                         config=config, batch_size=batch_size,
                                         progress=progress)
        table = video_table(profiles)
    written = write_outputs_nd(profiles, out) if out else []
    return profiles, table, written
