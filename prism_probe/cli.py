"""The ``prism-probe`` command line: a thin layer over the importable API.

Each command imports torch and the model libraries inside its body, so ``--help`` and
``prism-probe encoders`` start without them. Results go to stdout (a table, or JSON with
``--json``); logs and progress go to stderr. A :class:`PrismError` is printed as one line and
the command exits non-zero.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import typer

from .errors import PrismError

app = typer.Typer(
    name="prism-probe",
    help="Measure the frequency spectra of vision encoders' features (the Prism Hypothesis).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("prism_probe")

RegistryOpt = typer.Option(None, "--registry", help="Extra registry YAML file(s); later wins "
                           "(also PRISM_PROBE_REGISTRY, several separated by ':').")
WeightsOpt = typer.Option(None, "--weights", help="Folder searched first for weight files "
                          "(also PRISM_PROBE_WEIGHTS).")
SlopeOpt = typer.Option("0.05,0.4", "--slope-range", help="Frequencies LO,HI (in --units) "
                        "over which the log-log slope is fitted.")
ImagesOpt = typer.Option(None, "--images", help="Folder (recursive), glob, or text file of "
                         "paths; default: the photos scikit-image ships.")


def _spectrum_config(window: str, keep_mean: bool, bands: int, cutoff: float, slope: str):
    """The SpectrumConfig that the spectrum and baseline options describe."""
    from .spectra import SpectrumConfig

    try:
        lo, hi = (float(v) for v in slope.split(","))
    except ValueError:
        raise PrismError(f"--slope-range {slope!r}: give two frequencies LO,HI, e.g. "
                         "--slope-range 0.05,0.4") from None
    return SpectrumConfig(window=None if window.lower() == "none" else window,
                          remove_mean=not keep_mean, n_dct_bands=bands, low_cutoff=cutoff,
                          slope_range=(lo, hi))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=_stderr_console(), show_time=False, show_path=False,
                          markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)


def _emit(profiles, table, written, as_json: bool) -> None:
    """Results on stdout (JSON or the table), then where the outputs went (stderr)."""
    if as_json:
        typer.echo(json.dumps([json.loads(p.to_json()) for p in profiles], indent=1))
    else:
        _stdout_console().print(table)
    for path in written:
        log.info("wrote %s", path)


def _stdout_console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped or captured output: rich would wrap tables at 80 columns, cramping intervals.
        console = Console(width=160)
    return console


def _registry(files: Optional[List[Path]]):
    from .registry import Registry

    return Registry.load(files or [])


def _fail(exc: PrismError) -> None:
    typer.echo(f"prism-probe: error: {exc}", err=True)
    raise typer.Exit(getattr(exc, "exit_code", 2))


INTERRUPTED = ("prism-probe: interrupted; outputs already written are complete, nothing "
               "half-written was left")


def _interrupted() -> None:
    # Typer turns KeyboardInterrupt into a silent exit 130; say what state the outputs are in.
    typer.echo(INTERRUPTED, err=True)
    raise typer.Exit(130)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("images"), TimeRemainingColumn(), console=_stderr_console(),
                    transient=True)


@app.command("encoders")
def encoders_cmd(
    registry: Optional[List[Path]] = RegistryOpt,
    weights: Optional[List[Path]] = WeightsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON."),
):
    """List the registry, marking which weights are present locally."""
    from . import weights as W

    try:
        reg = _registry(registry)
        dirs = W.weights_dirs(weights)
        rows = []
        for e in reg:
            state, where = W.presence(e, dirs)
            rows.append({**e.to_dict(), "weights_present": state, "weights_location": where})
    except PrismError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    mark = {"local": "[green]local[/]", "cache": "[green]cache[/]", "builtin": "built-in",
            "run": "name a run: uae:RUN",
            "missing": "[dim]missing[/]"}
    table = Table(title=f"{len(rows)} encoders ({', '.join(str(f) for f in reg.files)})")
    for col in ("name", "family", "backend", "identifier", "input", "layer", "weights"):
        table.add_column(col)
    for r in rows:
        size = r["input"].get("size")
        if size is None:  # sequence entries are bounded by tokens, not pixels
            shown = f"≤{r['input'].get('max_tokens')} tokens"
        else:
            shown = f"{size} px" if isinstance(size, int) else f"{size[0]}×{size[1]} px"
            if r["input"].get("frames"):
                shown += f", {r['input']['frames']} frames"
        table.add_row(r["name"], r["family"], r["backend"], str(r["id"] or ""), shown,
                      str(r["features"].get("layer", "")), mark[r["weights_present"]])
    _stdout_console().print(table)


@app.command("spectrum")
def spectrum_cmd(
    encoders: Optional[List[str]] = typer.Argument(
        None, help="Registry names, random:NAME, pixels[:P], uae:RUN. Default: pixels and every "
        "entry whose weights are present."),
    images: Optional[str] = ImagesOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most N images (seeded "
                                        "subsample, order kept)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --limit sampling."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write profiles and figures here."),
    registry: Optional[List[Path]] = RegistryOpt,
    weights: Optional[List[Path]] = WeightsOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 autocast on CUDA, float32 "
                              "on CPU), float32, bfloat16, float16."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="Image decoding processes."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Override every "
                                             "encoder's input size (pixels)."),
    grid: Optional[int] = typer.Option(None, "--grid", help="Pool every feature map to N×N "
                                       "before measuring (a common grid)."),
    units: str = typer.Option("cell", "--units", help="cell: cycles per grid cell; pixel: "
                              "cycles per input pixel."),
    window: str = typer.Option("hann", "--window", help="hann or none."),
    no_mean: bool = typer.Option(False, "--keep-mean", help="Do not subtract each channel's "
                                 "spatial mean."),
    cutoff: float = typer.Option(0.125, "--cutoff", help="Low-band share cutoff, in --units."),
    bands: int = typer.Option(10, "--bands", min=0, help="DCT zig-zag bands for e(k); 0 "
                              "skips the DCT measure."),
    slope_range: str = SlopeOpt,
    video: Optional[List[str]] = typer.Option(
        None, "--video", help="Video files or frame folders (one clip each): video entries "
        "encode clips, image entries run per frame (docs/modalities.md)."),
    synthetic_motion: Optional[str] = typer.Option(
        None, "--synthetic-motion", help="pan or zoom: clips made from the --images stills by "
        "a known camera motion."),
    frames: Optional[int] = typer.Option(None, "--frames", min=1, help="Frames per clip "
                                         "(default: the first video entry's, else 16)."),
    frame_step: int = typer.Option(1, "--frame-step", min=1, help="Decoded frames between "
                                   "clip frames."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file (one sequence per "
                                        "line) or FASTA: sequence entries, spectra along "
                                        "tokens per layer."),
    dedupe: bool = typer.Option(False, "--dedupe", help="Drop files whose content repeats an "
                                "earlier file's (duplicates are reported either way)."),
    max_pixels: Optional[int] = typer.Option(
        None, "--max-pixels", min=0, help="Skip images whose header claims more pixels "
        "(decompression-bomb guard; default 178956970); 0: Pillow's own limit only."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Measure and compare the spectra of encoders' feature maps on a set of images."""
    _setup_logging(verbose, quiet=as_json)
    try:
        from .data import DEFAULT_MAX_PIXELS
        from .measure import is_main_process, measure_spectra
        from .profile import ensure_writable
        from .report import spectrum_table, write_outputs

        config = _spectrum_config(window, no_mean, bands, cutoff, slope_range)
        if out and is_main_process():
            ensure_writable(out)  # fail now, not after a long measurement
        progress = _progress(not as_json and is_main_process())
        if video or synthetic_motion or text is not None:
            from .modalities import run_spectrum

            with progress or nullcontext():
                profiles, table, written = run_spectrum(
                    encoders, video=video, synthetic_motion=synthetic_motion, text=text,
                    frames=frames, frame_step=frame_step, images=images, limit=limit,
                    seed=seed, out=out, registry=_registry(registry), weights_dir=weights,
                    device=device, batch_size=min(batch_size, 8), window=config.window,
                    remove_mean=not no_mean, bands=bands, cutoff=cutoff, progress=progress,
                    image_options={"grid": grid, "units": units, "image_size": image_size,
                                   "dedupe": dedupe, "max_pixels": max_pixels,
                                   "workers": workers})
            _emit(profiles, table, written, as_json)
            return
        with progress or nullcontext():
            profiles = measure_spectra(
                encoders, images, registry=_registry(registry), weights_dir=weights,
                device=device, image_size=image_size, limit=limit, seed=seed, config=config,
                grid=grid, units=units, batch_size=batch_size, workers=workers, dtype=dtype,
                progress=progress, dedupe=dedupe,
                max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels or None)
        if not is_main_process():
            return
        written = write_outputs(profiles, out) if out else []
    except PrismError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted()
    _emit(profiles, spectrum_table(profiles), written, as_json)


@app.command("plot")
def plot_cmd(
    profiles: List[Path] = typer.Argument(..., help="Profile JSON files from `spectrum --out`."),
    out: Path = typer.Option(Path("spectra.png"), "--out", "-o", help="Figure file; a .pdf "
                             "beside a .png is written too with --pdf."),
    pdf: bool = typer.Option(False, "--pdf", help="Also write a PDF next to the PNG."),
    width: float = typer.Option(10.0, "--width", help="Figure width in inches."),
    height: float = typer.Option(4.0, "--height", help="Figure height in inches."),
    font_size: float = typer.Option(9.0, "--font-size"),
    xscale: str = typer.Option("log", "--xscale", help="log or linear."),
    yscale: str = typer.Option("log", "--yscale", help="log or linear."),
    normalize: str = typer.Option("white", "--normalize", help="white (power / mean power per "
                                  "cell: white noise = 1), total, peak or none."),
    units: Optional[str] = typer.Option(None, "--units", help="cell or pixel (default: as "
                                        "measured)."),
):
    """Redraw the comparison figure from saved profiles."""
    try:
        from .plot import load_profiles, plot_profiles

        loaded = load_profiles(profiles)  # remembers each path, for messages naming the file
        if any(p.protocol.get("modality", "image") != "image" for p in loaded):
            from .plot_nd import plot_any  # video and sequence figures have their own panels

            for p in plot_any(loaded, out, pdf=pdf):
                typer.echo(str(p))
            return
        paths = plot_profiles(loaded, out, pdf=pdf, size=(width, height), font_size=font_size,
                              xscale=xscale, yscale=yscale, normalize=normalize, units=units)
    except PrismError as exc:
        _fail(exc)
    for p in paths:
        typer.echo(str(p))


@app.command("check")
def check_cmd(
    profile: Path = typer.Argument(..., help="Profile JSON to check (from `spectrum --out`, "
                                   "`ablate` or `baseline`)."),
    baseline: Path = typer.Option(..., "--baseline", help="The baseline profile it must match."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance of every "
                                         "quantity (default 1e-4; log power: |Δln| ≤ rtol)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (default "
                                         "1e-7)."),
    tolerances: Optional[Path] = typer.Option(None, "--tolerances", help="YAML of per-key "
                                              "tolerances, e.g. 'power: {log_atol: 0.05}'."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Compare a profile with a baseline: exit 0 agree, 1 drifted, 2 cannot be compared."""
    try:
        from .check import Tolerances, load_and_compare

        result = load_and_compare(profile, baseline,
                                  Tolerances.from_options(rtol, atol, tolerances))
    except PrismError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1, allow_nan=False))
    else:
        from rich.console import Console

        console = Console()
        if result.status != "ok":
            console.print(result.table())
        console.print(result.message(), markup=False, highlight=False)
    raise typer.Exit(result.exit_code)


@app.command("baseline")
def baseline_cmd(
    encoder: str = typer.Argument(..., help="Registry name (or random:NAME, pixels:P)."),
    out: Path = typer.Option(..., "--out", help="Baseline JSON file to write or update."),
    force: bool = typer.Option(False, "--force", help="Replace a baseline of another "
                               "protocol or encoder entry."),
    images: Optional[str] = ImagesOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most N images (seeded "
                                        "subsample, order kept)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --limit sampling and random weights."),
    registry: Optional[List[Path]] = RegistryOpt,
    weights: Optional[List[Path]] = WeightsOpt,
    device: str = typer.Option("cpu", "--device", help="cpu (bit-for-bit reproducible), cuda or "
                               "cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16, float16."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Pin torch's intra-op "
                                          "threads (their count can change float sums)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Override the "
                                             "encoder's input size (pixels)."),
    grid: Optional[int] = typer.Option(None, "--grid", help="Pool the feature map to N×N."),
    units: str = typer.Option("cell", "--units", help="cell or pixel."),
    window: str = typer.Option("hann", "--window", help="hann or none."),
    no_mean: bool = typer.Option(False, "--keep-mean", help="Do not subtract channel means."),
    cutoff: float = typer.Option(0.125, "--cutoff", help="Low-band share cutoff, in --units."),
    bands: int = typer.Option(10, "--bands", min=0, help="DCT zig-zag bands for e(k); 0 "
                              "skips the DCT measure."),
    slope_range: str = SlopeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Measure one encoder reproducibly and write (or update) a baseline profile."""
    _setup_logging(verbose)
    try:
        from .check import measure_baseline, write_baseline
        from .profile import ensure_writable

        config = _spectrum_config(window, no_mean, bands, cutoff, slope_range)
        ensure_writable(Path(out).parent)  # fail now, not after the measurement
        profile = measure_baseline(
            encoder, images, threads=threads, registry=_registry(registry), weights_dir=weights,
            device=device, image_size=image_size, limit=limit, seed=seed, config=config,
            grid=grid, units=units, batch_size=batch_size, dtype=dtype)
        action = write_baseline(profile, out, force=force)
    except PrismError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted()
    typer.echo(f"{action} {out} ({profile.label}, {profile.images['n_used']} images)")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PrismError(f"{what} {text!r}: give comma-separated numbers, e.g. 0.05,0.1,0.2")


@app.command("ablate")
def ablate_cmd(
    encoders: List[str] = typer.Argument(..., help="Registry names (random:NAME too); several "
                                         "encoders share one table and one figure."),
    mode: Optional[str] = typer.Option(
        None, "--mode", help="input (default): filter the images (cutoffs in cycles per input "
        "pixel); feature: filter the map at --layer and continue the forward pass; latent: "
        "filter an autoencoder's latent and decode (cutoffs in cycles per cell). With --video: "
        "tokens (default; block --layer's tokens along time, cycles per temporal cell) or input "
        "(the frames along time, cycles per frame); with --text: tokens only."),
    bands: str = typer.Option("low,high", "--bands", help="Comma-separated: low, high, all."),
    cutoffs: str = typer.Option("0,0.05,0.1,0.2,0.3,0.5", "--cutoffs", help="Radial cutoffs; "
                                "a low-pass keeps |f| <= cutoff, a high-pass the rest."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Split point for --mode feature "
                                        "(layer1/layer2 for CIFAR ResNets, blocks.K for ViTs); "
                                        "the last map before a global pool is refused. With "
                                        "--video/--text: a block index (default 0)."),
    domain: str = typer.Option("fft", "--domain", help="fft (radial rings) or dct."),
    transition: float = typer.Option(0.0, "--transition", help="Raised-cosine width, in cutoff "
                                     "units (0: ideal mask)."),
    train: Optional[Path] = typer.Option(None, "--train", help="Labeled ImageFolder for the kNN "
                                         "bank and the linear probe (unablated)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Labeled ImageFolder to ablate "
                                        "and score (own head, kNN, probe, cosine)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Use a seeded subset of "
                                            "N images per class of --train/--test."),
    images: Optional[str] = ImagesOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most N --images (seeded "
                                        "subsample, order kept)."),
    seed: int = typer.Option(0, "--seed", help="Seed for subsets and the linear probe."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write ablation profiles and the "
                                       "figure here."),
    registry: Optional[List[Path]] = RegistryOpt,
    weights: Optional[List[Path]] = WeightsOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16, float16."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="Image decoding processes."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Pin torch's intra-op "
                                          "threads (1 is fastest on a busy CPU)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Override every "
                                             "encoder's input size (pixels)."),
    video: Optional[List[str]] = typer.Option(
        None, "--video", help="Video files or frame folders (one clip each): temporal band "
        "ablation (prism_probe.video.ablate_video); cosine, relative change and kept energy of "
        "the final features; --out writes JSON profiles and ablation.png."),
    synthetic_motion: Optional[str] = typer.Option(
        None, "--synthetic-motion", help="pan or zoom: clips made from the --images stills, "
        "ablated as with --video."),
    frames: Optional[int] = typer.Option(None, "--frames", min=1, help="Frames per clip "
                                         "(default: the first video entry's, else 16)."),
    frame_step: int = typer.Option(1, "--frame-step", min=1, help="Decoded frames between "
                                   "clip frames."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file (one sequence per "
                                        "line) or FASTA: token-axis ablation of sequence "
                                        "entries (prism_probe.sequence.ablate_sequence); "
                                        "--out as for --video."),
    as_json: bool = typer.Option(False, "--json", help="Print the profiles as JSON on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Remove a band of spatial frequencies and measure what is lost (score vs cutoff).

    With --video/--synthetic-motion the band is temporal, with --text along tokens
    (docs/modalities.md); --train, --test, --per-class, --workers, --image-size, --dtype and
    --domain are image-only and refused there.
    """
    _setup_logging(verbose, quiet=as_json)
    if video or synthetic_motion or text is not None:
        _ablate_nd(encoders, mode=mode, bands=bands, cutoffs=cutoffs, layer=layer,
                   transition=transition, video=video, synthetic_motion=synthetic_motion,
                   text=text, frames=frames, frame_step=frame_step, images=images,
                   limit=limit, seed=seed, out=out, registry=registry, weights=weights,
                   device=device, batch_size=batch_size, threads=threads, as_json=as_json,
                   image_options={"train": train, "test": test, "per_class": per_class,
                                  "workers": workers, "image_size": image_size,
                                  "dtype": dtype, "domain": domain})
        return
    mode = mode or "input"
    try:
        from .measure import is_main_process
        from .plot_ablation import ablation_table, write_ablation_outputs
        from .probes import AblationConfig, run_ablation

        if threads:
            import torch

            torch.set_num_threads(threads)
        config = AblationConfig(mode=mode, bands=tuple(b for b in bands.split(",") if b),
                                cutoffs=tuple(_floats(cutoffs, "--cutoffs")), layer=layer,
                                domain=domain, transition=transition, seed=seed)
        if out and is_main_process():
            from .profile import ensure_writable

            ensure_writable(out)  # fail now, not after a long sweep
        progress = _progress(not as_json and is_main_process())
        with progress or nullcontext():
            profiles = run_ablation(
                encoders, config, test=test, train=train, images=images, per_class=per_class,
                limit=limit, seed=seed, registry=_registry(registry), weights_dir=weights,
                device=device, image_size=image_size, batch_size=batch_size, workers=workers,
                dtype=dtype, progress=progress)
        if not is_main_process():
            return
        written = write_ablation_outputs(profiles, out) if out else []
    except PrismError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted()
    _emit(profiles, ablation_table(profiles), written, as_json)


def _ablate_nd(encoders, *, mode, bands, cutoffs, layer, threads, as_json, out, registry,
               weights, **kwargs) -> None:
    """``ablate --video/--synthetic-motion/--text``: prism_probe.modalities.run_ablation_nd."""
    try:
        from .modalities import run_ablation_nd
        from .profile import ensure_writable

        if threads:
            import torch

            torch.set_num_threads(threads)
        try:
            block = 0 if layer is None else int(layer)
        except ValueError:
            raise PrismError(f"--layer {layer!r}: with --video/--text give a block index, "
                             "e.g. 0") from None
        if out:
            ensure_writable(out)  # fail now, not after a long sweep
        progress = _progress(not as_json)
        with progress or nullcontext():
            profiles, table, written = run_ablation_nd(
                encoders, mode=mode, bands=tuple(b for b in bands.split(",") if b),
                cutoffs=tuple(_floats(cutoffs, "--cutoffs")), layer=block, out=out,
                registry=_registry(registry), weights_dir=weights, progress=progress,
                **{**kwargs, "batch_size": min(kwargs["batch_size"], 8)})
    except PrismError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted()
    _emit(profiles, table, written, as_json)


@app.command("train-uae")
def train_uae_cmd(
    out: Path = typer.Option(..., "--out", help="Run folder (config, metrics.jsonl, grids, "
                             "checkpoints)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="tiny-cpu or paper-dinov2-b."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file merged over the "
                                          "preset."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE override, e.g. "
                                             "optim.lr=1e-4 or stages.0.steps=50 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly, "
                                "with the configuration it was trained with."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop (with a "
                                             "checkpoint) after this many steps in total."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Train a UAE (staged: decoder warm-up, joint with semantic loss, adversarial).

    Runs under torchrun as well: torchrun --nproc_per_node N --no-python prism-probe train-uae …
    """
    _setup_logging(verbose)
    try:
        from .uae.train import resolve_config, saved_config, train

        if resume and not (preset or config or sets):
            cfg = saved_config(out)  # continue the run exactly as it was configured
        else:
            cfg = resolve_config(preset, config, list(sets or []))
        train(cfg, out, resume=resume, stop_after=stop_after)
    except PrismError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        # Not the generic line: say which checkpoint is left and how to continue from it.
        from .uae.train import interrupted_message

        typer.echo(interrupted_message(out), err=True)
        raise typer.Exit(130)


@app.command("eval-uae")
def eval_uae_cmd(
    run: Path = typer.Argument(..., help="A run folder written by train-uae."),
    images: Optional[str] = ImagesOpt,
    fd_encoder: Optional[str] = typer.Option(None, "--fd-encoder", help="Registered encoder "
                                             "whose features the Fréchet distance uses "
                                             "(default: the run's encoder)."),
    weights: Optional[List[Path]] = WeightsOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many images."),
    batch_size: int = typer.Option(64, "--batch-size"),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results (JSON) and the "
                                       "band-wise reconstruction grid (PNG) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    device: str = typer.Option("auto", "--device"),
):
    """PSNR, SSIM, Fréchet distance and band-wise reconstructions of a trained UAE."""
    _setup_logging(False, quiet=as_json)
    try:
        from .uae.eval import evaluate_run, format_results

        result = evaluate_run(run, images, fd_encoder=fd_encoder, weights_dir=weights,
                              limit=limit, batch_size=batch_size, out=out, device=device)
    except PrismError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted()
    typer.echo(json.dumps(result, indent=1) if as_json else format_results(result))


def main() -> None:
    """Entry point of the ``prism-probe`` script."""
    try:
        app()
    except KeyboardInterrupt:  # outside a command (Typer handles it inside them)
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
