"""What ``prism-probe spectrum`` and ``ablate`` do with ``--video``, ``--synthetic-motion``
or ``--text``.

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


# Image-only options of the ablate command, with the values that mean "not given".
ABLATE_IMAGE_ONLY = {"train": None, "test": None, "per_class": None, "workers": 0,
                     "image_size": None, "dtype": "auto", "domain": "fft"}
#: A low-pass at this cutoff keeps every frequency (|f| <= 0.5 cycles per cell or token).
ALL_PASS = 1.0


def _refuse(given: dict[str, Any], options: dict[str, Any], what: str) -> None:
    for key, default in options.items():
        if key in given and given[key] != default:
            flag = "--" + key.replace("_", "-")
            raise PrismError(f"{flag} applies to images only, not to {what}; drop it")


def _ablation_rows(ablate, bands: Sequence[str], cutoffs: Sequence[float]) -> list[dict]:
    """Rows of (band, cutoff, scores) from ``ablate(cutoffs, band)`` (an ablate_* partial)."""
    rows = []
    for band in bands:
        if band not in ("low", "high", "all"):
            raise PrismError(f"--bands {band!r}: use low, high or all")
        if band == "all":
            r = ablate([ALL_PASS], "low")
            cuts = [None]
        elif not cutoffs:
            raise PrismError(f"--bands {band} needs --cutoffs")
        else:
            r = ablate(list(cutoffs), band)
            cuts = list(cutoffs)
        for i, cut in enumerate(cuts):
            rows.append({"band": band, "cutoff": cut,
                         "scores": {k: r[k][i] for k in ("cosine", "relative_change",
                                                          "kept_energy")}})
    return rows


def _ablation_profile(encoder, modality: str, r_settings: dict, rows: list[dict],
                      images: dict, extra: dict | None = None):
    import torch

    from .profile import Profile, library_versions

    ablation = {"mode": r_settings["mode"], "domain": "temporal" if modality == "video"
                else "tokens", "layer": r_settings["layer"],
                "transition": r_settings["transition"],
                "bands": sorted({row["band"] for row in rows}),
                "all_pass_cutoff": ALL_PASS}
    protocol = {"modality": modality, "ablation": ablation, **(extra or {})}
    result = {"units": r_settings["units"],
              "unablated": {"cosine": 1.0, "relative_change": 0.0, "kept_energy": 1.0},
              "rows": rows}
    env = library_versions()
    env.update(device=str(encoder.device), threads=torch.get_num_threads())
    return Profile(kind="ablation", encoder=encoder.describe(), protocol=protocol,
                   images=images, result=result, environment=env)


def ablation_nd_table(profiles):
    """One row per encoder × (band, cutoff): cosine, relative change, kept energy."""
    from rich.table import Table

    if not profiles:
        return Table(title="no ablation profiles")
    p0 = profiles[0]
    ab = p0.protocol["ablation"]
    where = f" at block {ab['layer']}" if ab["layer"] is not None else ""
    table = Table(title=f"{p0.protocol['modality'].capitalize()} band ablation — "
                  f"{ab['mode']}{where}",
                  caption=f"cutoffs in {p0.result['units']}; all: every frequency kept")
    for col in ("encoder", "band", "cutoff", "cosine", "rel. change", "kept energy"):
        table.add_column(col, justify="left" if col in ("encoder", "band") else "right")
    for p in profiles:
        table.add_row(p.label, "unablated", "–", "1.000", "0.000", "1.000")
        for row in p.result["rows"]:
            s = row["scores"]
            cut = "–" if row["cutoff"] is None else f"{row['cutoff']:g}"
            table.add_row("", row["band"], cut, f"{s['cosine']:.3f}",
                          f"{s['relative_change']:.3f}", f"{s['kept_energy']:.3f}")
    return table


def run_ablation_nd(encoders: Sequence[str], *, video: Sequence[str] | None = None,
                    synthetic_motion: str | None = None, text: str | Path | None = None,
                    mode: str | None = None, bands: Sequence[str] = ("low", "high"),
                    cutoffs: Sequence[float] = (), layer: int = 0, transition: float = 0.0,
                    frames: int | None = None, frame_step: int = 1, images=None,
                    limit: int | None = None, seed: int = 0, out=None, registry=None,
                    weights_dir=None, device: str = "auto", batch_size: int = 4,
                    progress=None, image_options: dict | None = None):
    """``ablate`` on video clips or token sequences; returns (profiles, table, written files).

    Video: :func:`prism_probe.video.ablate_video` (``mode`` tokens, the default, or input);
    sequences: :func:`prism_probe.sequence.ablate_sequence` (tokens only). Band ``all`` is a
    low-pass at :data:`ALL_PASS`, which keeps every frequency (cosine 1 up to rounding).
    """
    import torch

    from .loading import resolve_device
    from .registry import Registry, parse_spec

    registry = registry or Registry.load()
    if text is not None and (video or synthetic_motion):
        raise PrismError("--text and --video/--synthetic-motion measure different inputs; run "
                         "them separately")
    if not encoders:
        raise PrismError("name the encoders to ablate")
    what = "sequences" if text is not None else "video clips"
    _refuse(image_options or {}, ABLATE_IMAGE_ONLY, what)
    mode = mode or "tokens"
    if text is not None and mode != "tokens":
        raise PrismError(f"--mode {mode}: sequences are ablated along tokens only "
                         "(--mode tokens)")
    if text is None and mode not in ("tokens", "input"):
        raise PrismError(f"--mode {mode}: video is ablated with --mode tokens or input")
    specs = [parse_spec(e, registry) for e in encoders]
    dev = str(resolve_device(device))
    profiles = []
    if text is not None:
        from .sequence import ablate_sequence, load_sequence_encoder, read_sequences

        seqs = read_sequences(text)
        if limit is not None:
            seqs = seqs[:limit]
        texts = [s for _, s in seqs]
        for spec in specs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                enc = load_sequence_encoder(spec, registry=registry, weights_dir=weights_dir,
                                            device=dev)
            token_ids = []
            for start in range(0, len(texts), 64):
                tok = enc.tokenize(texts[start:start + 64])
                for ids, keep in zip(tok["input_ids"], tok["attention_mask"]):
                    token_ids.append(ids[keep.bool()].tolist())
            settings = {}

            def ablate(cuts, band, enc=enc, token_ids=token_ids, settings=settings):
                r = ablate_sequence(enc, token_ids, cuts, layer=layer, band=band,
                                    transition=0.0 if band == "all" else transition,
                                    batch_size=batch_size)
                settings.update(r)
                return r

            rows = _ablation_rows(ablate, bands, cutoffs)
            settings["transition"] = transition
            info = {"source": str(text), "n_used": len(token_ids),
                    "names": [n for n, _ in seqs]}
            profiles.append(_ablation_profile(enc, "sequence", settings, rows, info))
            del enc
    else:
        from .video import ablate_video, collect_clips, load_video_encoder

        if frames is None:
            frames = 16
            for spec in specs:
                if spec.entry.modality == "video" and spec.entry.input.get("frames"):
                    frames = int(spec.entry.input["frames"])
                    break
        clips = collect_clips(video, frames=frames, step=frame_step,
                              synthetic_motion=synthetic_motion, images=images, limit=limit,
                              seed=seed)
        for spec in specs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                enc = load_video_encoder(spec, registry=registry, weights_dir=weights_dir,
                                         device=dev)
            need = getattr(enc, "num_frames", None)
            if need is not None and need != clips.frames:
                raise PrismError(f"'{enc.label}' takes clips of {need} frames; these have "
                                 f"{clips.frames} (use --frames {need})")
            settings = {}

            def ablate(cuts, band, enc=enc, settings=settings):
                r = ablate_video(enc, clips, cuts, band=band, mode=mode, layer=layer,
                                 transition=0.0 if band == "all" else transition,
                                 batch_size=batch_size)
                settings.update(r)
                return r

            rows = _ablation_rows(ablate, bands, cutoffs)
            settings["transition"] = transition
            info = {**clips.to_dict(), "n_used": len(clips)}
            extra = {"frames": clips.frames, "frame_step": clips.step}
            profiles.append(_ablation_profile(enc, "video", settings, rows, info, extra))
            del enc
    written = []
    if out:
        from .plot_ablation import write_ablation_outputs

        written = write_ablation_outputs(profiles, out)
    return profiles, ablation_nd_table(profiles), written
